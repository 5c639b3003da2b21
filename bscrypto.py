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
#
# The storage daemon's <WorkingDirectory>/bareos-sd.<port>.cryptoc (FORMATS.md
# section 5): a 32-byte header, then one raw C struct per entry in the
# writing host's byte order and pointer size.  Names and keys are C strings;
# they are held here as str decoded from UTF-8 with "surrogateescape", so any
# byte sequence Bareos stored survives read, dump and write unchanged.
#
# Bareos erases a cache it cannot read and rewrites in place without a lock.
# Here a cache that cannot be read is never changed; writers hold an flock on
# CACHE.lock for the whole read-modify-write and replace the file by rename.

CACHE_ID = b"BAREOS Crypto Cache\n"     # char id[21]; Bareos ignores byte 20 (forces NUL)
CACHE_VERSION = 1
CACHE_HEADER_SIZE = 32                  # id[21], 3 padding bytes, int32 version, int32 count
CACHE_STRING_SIZE = 128                 # Bareos MAX_NAME_LENGTH: 127 bytes and a NUL
CACHE_EXPIRY_SECONDS = 60 * 24 * 3600   # Bareos CRYPTO_CACHE_MAX_AGE
CACHE_NEW_FILE_MODE = 0o640             # what Bareos creates
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


def warn(message):
    sys.stderr.write("bscrypto: warning: %s\n" % message)


def host_cache_layout():
    """The layout the storage daemon on this host writes."""
    import struct
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
    import struct
    return struct.Struct("%s%dx%ds%dsq" % (layout.byteorder, 2 * layout.pointer_size,
                                           CACHE_STRING_SIZE, CACHE_STRING_SIZE))


class _GcPaused:
    """Pause the cyclic GC while building many tuples (none of them in cycles).

    Otherwise each full collection rescans every entry already built, and
    100,000 entries take 1.5-2x as long as 10 x 10,000.
    """

    def __enter__(self):
        import gc
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            import gc
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
    import struct
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


def _read_cache_bytes(path):
    import errno
    import stat
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CacheError("%s is not a regular file, not a crypto cache" % path)
            return f.read()
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise CacheMissingError("crypto cache %s does not exist (the storage daemon's is "
                                    "<WorkingDirectory>/bareos-sd.<port>.cryptoc)" % path)
        raise CacheError("cannot read crypto cache %s: %s" % (path, e.strerror or e))


def read_cache(path, raw=False):
    """Read a cache of any layout; CacheError when it cannot.  Never writes.

    Names and keys are str (UTF-8, surrogateescape), or bytes with raw=True.
    """
    cache, trailing = parse_cache(_read_cache_bytes(path), path, raw)
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
    import struct
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
    if now is not None:
        return int(now)
    env = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise UsageError("SOURCE_DATE_EPOCH must be whole seconds since 1970, not %r" % env)
    import time
    return int(time.time())


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
        import time
        try:
            text = time.strftime(fmt, convert(t)).encode("ascii")
        except (OverflowError, OSError, ValueError):
            text = str(t).encode("ascii")     # beyond what the C library converts
        memo[t] = text
    return text


def format_cache_table(entries):
    """Bareos's -D output, as bytes: its own "%-*s %-*s %-20s %-20s" rows, local time."""
    import time
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
    import time
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


# -- locking and atomic, durable replacement --


class _CacheLock:
    """Exclusive flock on CACHE.lock; released on exit (and by the kernel on death)."""

    def __init__(self, path):
        self.path = os.path.realpath(path) + ".lock"
        self.fd = None

    def __enter__(self):
        import errno
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, CACHE_NEW_FILE_MODE)
        except OSError as e:
            raise CacheError("cannot open lock file %s: %s" % (self.path, e.strerror or e))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                debug(1, "waiting for the lock on %s" % self.path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            raise CacheError("cannot lock %s: %s" % (self.path, e.strerror or e))
        self.fd = fd
        _give_owner_of(self.path[:-len(".lock")], fd)
        return self

    def __exit__(self, *exc):
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None
        return False


def cache_lock(path):
    """Context manager: exclusive flock on path + ".lock" around a read-modify-write."""
    return _CacheLock(path)


def _give_owner_of(original, fd):
    """Give fd's file the owner of original (if it exists and differs); best effort."""
    try:
        st = os.stat(original)
        mine = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (mine.st_uid, mine.st_gid):
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass    # some filesystems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _remove_stale_temps(directory, base):
    """Temporary files of writers that died (killed mid-write) beside the cache."""
    prefix = "." + base + "."
    try:
        names = os.listdir(directory)
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
            os.unlink(os.path.join(directory, name))
            debug(1, "removed %s left by a writer that died" % name)
        except OSError:
            pass


def _replace_file(path, data, like=None, mode=CACHE_NEW_FILE_MODE):
    """Write data to path by temp file, fsync and rename; owner and mode from `like`."""
    import binascii
    directory, base = os.path.split(path)
    directory = directory or "."
    _remove_stale_temps(directory, base)
    tmp = os.path.join(directory, ".%s.%d.%s.tmp" % (
        base, os.getpid(), binascii.hexlify(os.urandom(4)).decode("ascii")))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fsync(fd)
            if like is not None:
                _give_owner_of(like, fd)
                mode = os.stat(like).st_mode & 0o7777
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CacheError("cannot write %s: %s; the old file is unchanged"
                         % (path, e.strerror or e))
    _fsync_directory(directory)


def backup_cache(path):
    """Copy the cache to CACHE.YYYYmmddTHHMMSSZ.bak (same mode, owner); its path or None."""
    import time
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return None
    data = _read_cache_bytes(real)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = "%s.%s.bak" % (real, stamp)
    n = 0
    while os.path.lexists(backup):
        n += 1
        backup = "%s.%s.%d.bak" % (real, stamp, n)
    _replace_file(backup, data, like=real)
    debug(1, "kept a copy of %s as %s" % (real, backup))
    return backup


def write_cache(path, entries, layout=None, backup=False):
    """Atomically replace the cache (caller holds cache_lock).

    Temp file in the same directory, fsync, the original's mode and owner
    (0640 for a new file), rename over, fsync the directory: a crash leaves
    the old cache or the new one.  `backup` first keeps a timestamped copy.
    """
    layout = cache_layout(layout)
    data = build_cache(entries, layout)      # refuse bad entries before touching anything
    real = os.path.realpath(path)
    if backup:
        backup_cache(real)
    _replace_file(real, data, like=real if os.path.exists(real) else None)
    debug(1, "wrote %d entries to %s (layout %s)" % (len(entries), real, layout.name))


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

# (label: BB02 block, record header, label fields)


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


def _stdin_stream():
    stdin = sys.stdin
    if stdin is None:       # started with stdin closed: no input
        import io
        return io.BytesIO(), False
    return getattr(stdin, "buffer", stdin), stdin.isatty()


def op_dump_cache(path, as_json=False, now=None, out=None):
    """-D: Bareos's table of the cache (or JSON); never changes the file."""
    cache = read_cache(path, raw=not as_json)
    out = out or _stdout_bytes()
    if as_json:
        out.write(cache_to_json(cache, path, resolve_now(now)).encode("ascii"))
    else:
        out.write(format_cache_table(cache.entries))
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
    target = cache_layout(layout)
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
    with cache_lock(path):
        try:
            cache = read_cache(path)
        except CacheMissingError:
            cache = CryptoCache([], None)
        entries, stats = apply_cache_updates(cache.entries, updates, now)
        convert = layout is not None and cache.layout not in (None, target)
        write = cache_changed(stats) or convert
        if write:
            if cache.layout not in (None, target):
                debug(1, "%s: rewriting layout %s as %s" % (path, cache.layout.name, target.name))
            write_cache(path, entries, target, backup)
    text = ("%s: %d added, %d updated, %d unchanged, %d expired removed; %s"
            % (path, stats["added"], stats["updated"], stats["unchanged"],
               stats["expired_removed"], "written" if write else "nothing changed, not written"))
    debug(1, text)
    if summary:
        sys.stdout.write(text + "\n")
    return EXIT_OK


def op_reset_cache(path, now=None, layout=None, backup=False):
    """-r: set every entry's time added to now (a missing cache is an error)."""
    now = resolve_now(now)
    target = cache_layout(layout)
    with cache_lock(path):
        cache = read_cache(path, raw=True)
        entries = reset_cache_times(cache.entries, now)
        if entries != cache.entries or (layout is not None and target != cache.layout):
            write_cache(path, entries, target, backup)
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
    out.write(data)
    out.flush()
    return EXIT_OK


# -- drive operations --


# -- recovery operations --


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
    # Crypto cache options (bscrypto.py additions, for -D, -p and -r).
    a("--json", action="store_true", help="-D: print the cache as JSON")
    a("--backup", action="store_true", help="-p, -r: first keep a timestamped copy of the cache")
    a("--now", metavar="EPOCH", type=int,
      help="take this Unix time as now (default $SOURCE_DATE_EPOCH, else the clock)")
    a("--layout", choices=[layout.name for layout in CACHE_LAYOUTS],
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
        p.add_argument("--now", metavar="EPOCH", type=int,
                       help="take this Unix time as now (default $SOURCE_DATE_EPOCH, else "
                            "the clock)")

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
    p.set_defaults(run=lambda ns: op_populate_cache(ns.cache, ns.now, ns.layout, ns.backup,
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


def _add_drive_commands(sub, common):
    """Drive subcommands."""


def _legacy_drive_ops(ns):
    """-c, -e, -s, -v."""
    return None


def _add_recovery_commands(sub, common):
    """Disaster-recovery subcommands."""


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
