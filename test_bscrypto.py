#!/usr/bin/env python3
"""Tests for bscrypto.py: unittest only, so `python3 test_bscrypto.py` runs bare.

Test classes follow the sections of bscrypto.py.  Known answers carry their
source.  Tests needing a dev-only package (cryptography, pyaes) skip cleanly.
"""

import io
import os
import random
import stat
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bscrypto  # noqa: E402

# The shared reference fixtures sit beside the project (../shared/reference).
REFERENCE = os.environ.get("BSCRYPTO_REFERENCE",
                           os.path.join(HERE, "..", "shared", "reference"))
FIXTURES = os.path.join(REFERENCE, "fixtures")
SCRIPT = os.path.join(HERE, "bscrypto.py")


def fixture(*parts):
    return os.path.join(FIXTURES, *parts)


def need_fixtures(testcase):
    if not os.path.isdir(FIXTURES):
        testcase.skipTest("reference fixtures not found at %s" % FIXTURES)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class _KeptBytesIO(io.BytesIO):
    """A BytesIO that survives its TextIOWrapper being closed."""

    def close(self):
        pass


class Captured(object):
    """Run bscrypto.main in-process with stdin/stdout/stderr captured."""

    def __init__(self, args, stdin=b"", tty=False):
        self.args = list(args)
        self.stdin = stdin
        self.tty = tty

    def run(self):
        out, err = _KeptBytesIO(), _KeptBytesIO()
        saved = sys.stdin, sys.stdout, sys.stderr
        stdin = io.TextIOWrapper(io.BytesIO(self.stdin), encoding="latin-1")
        stdin.isatty = lambda: self.tty
        sys.stdin = stdin
        sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
        try:
            rc = bscrypto.main(self.args)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved
        return rc, out.getvalue(), err.getvalue().decode("utf-8")


def cli(*args, **kw):
    """(exit code, stdout bytes, stderr text) of one in-process run."""
    return Captured(args, **kw).run()


class TempDirTestCase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp, name)

    def write(self, name, data, mode=0o600):
        p = self.path(name)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p


# ---------------------------------------------------------------------------
# AES and RFC 3394 key wrap
# ---------------------------------------------------------------------------

class TestAES(unittest.TestCase):
    # FIPS-197 Appendix C.1-C.3 (plaintext 00112233...eeff).
    def test_fips197_appendix_c(self):
        pt = bytes.fromhex(bscrypto._FIPS197_PLAINTEXT)
        self.assertEqual(len(bscrypto._FIPS197_VECTORS), 3)
        for name, key, ct in bscrypto._FIPS197_VECTORS:
            aes = bscrypto.AES(bytes.fromhex(key))
            self.assertEqual(aes.encrypt_block(pt).hex(), ct, name)
            self.assertEqual(aes.decrypt_block(bytes.fromhex(ct)), pt, name)

    # FIPS-197 Appendix B (the worked example).
    def test_fips197_appendix_b(self):
        aes = bscrypto.AES(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
        ct = aes.encrypt_block(bytes.fromhex("3243f6a8885a308d313198a2e0370734"))
        self.assertEqual(ct.hex(), "3925841d02dc09fbdc118597196a0b32")

    # NIST SP 800-38A F.1.1/F.1.5 ECB vectors (AES-128 and AES-256), all four blocks.
    def test_sp800_38a_ecb(self):
        pts = ["6bc1bee22e409f96e93d7e117393172a", "ae2d8a571e03ac9c9eb76fac45af8e51",
               "30c81c46a35ce411e5fbc1191a0a52ef", "f69f2445df4f9b17ad2b417be66c3710"]
        cases = [("2b7e151628aed2a6abf7158809cf4f3c",
                  ["3ad77bb40d7a3660a89ecaf32466ef97", "f5d3d58503b9699de785895a96fdbaaf",
                   "43b1cd7f598ece23881b00e3ed030688", "7b0c785e27e8ad3f8223207104725dd4"]),
                 ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
                  ["f3eed1bdb5d2a03c064b5a7e3db181f8", "591ccb10d410ed26dc5ba74a31362870",
                   "b6ed21b99ca6f4f9f153e7b1beafed1d", "23304b7a39f9f3ff067d8d8f9e24ecc7"])]
        for key, cts in cases:
            aes = bscrypto.AES(bytes.fromhex(key))
            for pt, ct in zip(pts, cts):
                self.assertEqual(aes.encrypt_block(bytes.fromhex(pt)).hex(), ct)
                self.assertEqual(aes.decrypt_block(bytes.fromhex(ct)).hex(), pt)

    def test_round_trip_random(self):
        rng = random.Random(1)
        for size in (16, 24, 32):
            for _ in range(50):
                key = bytes(rng.getrandbits(8) for _ in range(size))
                block = bytes(rng.getrandbits(8) for _ in range(16))
                aes = bscrypto.AES(key)
                self.assertEqual(aes.decrypt_block(aes.encrypt_block(block)), block)

    def test_bad_sizes(self):
        self.assertRaises(ValueError, bscrypto.AES, b"x" * 15)
        self.assertRaises(ValueError, bscrypto.AES(b"k" * 16).encrypt_block, b"short")

    def test_against_cryptography(self):
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        except ImportError:
            self.skipTest("cryptography not installed (dev-only oracle)")
        rng = random.Random(2)
        for size in (16, 24, 32):
            for _ in range(100):
                key = bytes(rng.getrandbits(8) for _ in range(size))
                block = bytes(rng.getrandbits(8) for _ in range(16))
                enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
                self.assertEqual(bscrypto.AES(key).encrypt_block(block), enc.update(block))


class TestKeyWrap(unittest.TestCase):
    # RFC 3394 section 4.1-4.6: every KEK/key size combination.
    VECTORS = [
        ("000102030405060708090A0B0C0D0E0F", "00112233445566778899AABBCCDDEEFF",
         "1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"),
        ("000102030405060708090A0B0C0D0E0F1011121314151617", "00112233445566778899AABBCCDDEEFF",
         "96778B25AE6CA435F92B5B97C050AED2468AB8A17AD84E5D"),
        ("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
         "00112233445566778899AABBCCDDEEFF",
         "64E8C3F9CE0F5BA263E9777905818A2A93C8191E7D6E8AE7"),
        ("000102030405060708090A0B0C0D0E0F1011121314151617",
         "00112233445566778899AABBCCDDEEFF0001020304050607",
         "031D33264E15D33268F24EC260743EDCE1C6C7DDEE725A936BA814915C6762D2"),
        ("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
         "00112233445566778899AABBCCDDEEFF0001020304050607",
         "A8F9BC1612C68B3FF6E6F4FBE30E71E4769C8B80A32CB8958CD5D17D6B254DA1"),
        ("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
         "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F",
         "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"),
    ]

    def test_rfc3394_vectors(self):
        for kek, key, wrapped in self.VECTORS:
            k, p, w = bytes.fromhex(kek), bytes.fromhex(key), bytes.fromhex(wrapped)
            self.assertEqual(bscrypto.aes_key_wrap(k, p), w)
            self.assertEqual(bscrypto.aes_key_unwrap(k, w), p)

    def test_every_flipped_bit_is_detected(self):
        kek, key, wrapped = (bytes.fromhex(x) for x in self.VECTORS[0])
        for i in range(len(wrapped) * 8):
            bad = bytearray(wrapped)
            bad[i // 8] ^= 1 << (i % 8)
            self.assertRaises(bscrypto.UnwrapError, bscrypto.aes_key_unwrap, kek, bytes(bad))

    def test_wrong_kek(self):
        w = bscrypto.aes_key_wrap(b"A" * 16, b"B" * 32)
        self.assertRaises(bscrypto.UnwrapError, bscrypto.aes_key_unwrap, b"C" * 16, w)

    def test_bad_lengths(self):
        self.assertRaises(ValueError, bscrypto.aes_key_wrap, b"A" * 16, b"B" * 12)
        self.assertRaises(ValueError, bscrypto.aes_key_unwrap, b"A" * 16, b"B" * 16)
        self.assertRaises(ValueError, bscrypto.aes_key_unwrap, b"A" * 15, b"B" * 40)

    def test_against_cryptography_1000_pairs(self):
        try:
            from cryptography.hazmat.primitives import keywrap
        except ImportError:
            self.skipTest("cryptography not installed (dev-only oracle)")
        rng = random.Random(3)
        for _ in range(1000):
            kek = bytes(rng.getrandbits(8) for _ in range(16))
            key = bytes(rng.getrandbits(8) for _ in range(32))
            wrapped = keywrap.aes_key_wrap(kek, key)
            self.assertEqual(bscrypto.aes_key_wrap(kek, key), wrapped)
            self.assertEqual(bscrypto.aes_key_unwrap(kek, wrapped), key)


# ---------------------------------------------------------------------------
# Encodings and passphrases
# ---------------------------------------------------------------------------

class TestBase64(unittest.TestCase):
    def test_no_padding_lengths(self):
        self.assertEqual(len(bscrypto.b64encode(b"x" * 32)), 43)
        self.assertEqual(len(bscrypto.b64encode(b"x" * 40)), 54)
        self.assertNotIn("=", bscrypto.b64encode(b"x" * 32))

    def test_decode_rules(self):
        data = bytes(range(40))
        text = bscrypto.b64encode(data)
        self.assertEqual(bscrypto.b64decode(text), data)
        self.assertEqual(bscrypto.b64decode(text + "=="), data)
        self.assertEqual(bscrypto.b64decode(text + " anything after a space"), data)
        self.assertEqual(bscrypto.b64decode(text.encode()), data)

    def test_rejects_invalid_characters(self):
        for bad in ("abc*", "ab-d", "a\tbc", "abc\x00", "ab\u00e9d"):
            with self.assertRaises(ValueError) as cm:
                bscrypto.b64decode(bad)
            self.assertIn("not base64", str(cm.exception))

    def test_rejects_impossible_length(self):
        self.assertRaises(ValueError, bscrypto.b64decode, "abcde")

    def test_round_trip_random(self):
        rng = random.Random(4)
        for n in range(0, 70):
            data = bytes(rng.getrandbits(8) for _ in range(n))
            self.assertEqual(bscrypto.b64decode(bscrypto.b64encode(data)), data)


class TestPassphrase(unittest.TestCase):
    ALPHABET = bscrypto.PASSPHRASE_ALPHABET

    def test_alphabet_is_bareos(self):
        self.assertEqual(len(self.ALPHABET), 90)
        self.assertEqual(len(set(self.ALPHABET)), 90)
        for c in "'\"\\` ":
            self.assertNotIn(c, self.ALPHABET)

    def test_length_and_alphabet(self):
        for _ in range(200):
            p = bscrypto.generate_passphrase()
            self.assertEqual(len(p), 32)
            self.assertTrue(set(p.decode("ascii")) <= set(self.ALPHABET))

    def test_uniform_not_bareos_modulo_bias(self):
        """>= 100,000 characters: Bareos's byte % 90 makes the first 76 characters
        1.5x as likely as the last 14; that must be measurably absent here."""
        counts = dict.fromkeys(self.ALPHABET, 0)
        n = 0
        while n < 100000:
            for c in bscrypto.generate_passphrase().decode("ascii"):
                counts[c] += 1
            n += 32
        head = sum(counts[c] for c in self.ALPHABET[:76]) / 76.0
        tail = sum(counts[c] for c in self.ALPHABET[76:]) / 14.0
        # Uniform: ratio ~1.00 (sd ~0.02 here); Bareos's bias: 1.5.
        self.assertLess(abs(head / tail - 1.0), 0.1, (head, tail))
        # Chi-square over 89 degrees of freedom; p < 1e-6 is above 160.
        expected = n / 90.0
        chi2 = sum((v - expected) ** 2 / expected for v in counts.values())
        self.assertLess(chi2, 160, chi2)

    def test_bias_check_would_catch_bareos(self):
        # The same statistic on Bareos's method proves the test can fail.
        rng = random.Random(5)
        counts = dict.fromkeys(self.ALPHABET, 0)
        for _ in range(100000):
            counts[self.ALPHABET[rng.getrandbits(8) % 90]] += 1
        head = sum(counts[c] for c in self.ALPHABET[:76]) / 76.0
        tail = sum(counts[c] for c in self.ALPHABET[76:]) / 14.0
        self.assertGreater(abs(head / tail - 1.0), 0.1)

    def test_drive_key_bytes(self):
        # FORMATS.md section 4: passphrase[0:31] + NUL.
        p = b"0123456789abcdefghijklmnopqrstuv"
        self.assertEqual(bscrypto.drive_key_bytes(p), p[:31] + b"\0")
        self.assertEqual(bscrypto.drive_key_bytes(b"short"), b"short" + b"\0" * 27)
        self.assertEqual(len(bscrypto.drive_key_bytes(b"x" * 40)), 32)

    def test_kek_from_text(self):
        self.assertEqual(bscrypto.kek_from_text(b"k" * 32), b"k" * 16)
        self.assertEqual(bscrypto.kek_from_text(b"abc"), b"abc" + b"\0" * 13)


# ---------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------

class TestKeyFileFixtures(unittest.TestCase):
    """Every file made by Bareos's C bscrypto gives Bareos's output."""

    def setUp(self):
        need_fixtures(self)

    def expect(self, args, expected_name):
        rc, out, err = cli(*args)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(out, read_bytes(fixture("keys", expected_name)))

    def test_show_raw(self):
        self.expect(["-k", fixture("keys", "raw.key")], "show_raw_key.expected")

    def test_show_base64(self):
        self.expect(["-b", "-k", fixture("keys", "b64.key")], "show_b64_key_with_-b.expected")

    def test_show_wrapped(self):
        self.expect(["-k", fixture("keys", "wrapped.key"), "-w", fixture("keys", "kek.key")],
                    "show_wrapped_key_with_-w.expected")

    def test_subcommand_show_wrapped(self):
        self.expect(["show", fixture("keys", "wrapped.key"), "--kek", fixture("keys", "kek.key")],
                    "show_wrapped_key_with_-w.expected")

    def test_wrap_triples(self):
        with open(fixture("keys", "wrap_triples.tsv"), "rb") as f:
            rows = [line.rstrip(b"\n").split(b"\t") for line in f if not line.startswith(b"#")]
        self.assertGreaterEqual(len(rows), 3)
        for kek, wrapped, plain in rows:
            self.assertEqual(bscrypto.unwrap_passphrase(kek, wrapped), plain)
            self.assertEqual(bscrypto.wrap_passphrase(kek, plain), wrapped.decode())

    def test_as_a_separate_process(self):
        out = subprocess.check_output([sys.executable, SCRIPT, "-k", fixture("keys", "wrapped.key"),
                                       "-w", fixture("keys", "kek.key")])
        self.assertEqual(out, read_bytes(fixture("keys", "show_wrapped_key_with_-w.expected")))


class TestKeyFiles(TempDirTestCase):
    def test_strip_rule(self):
        self.assertEqual(bscrypto.strip_key_text(b"key \r\n \n"), b"key")
        self.assertEqual(bscrypto.strip_key_text(b"key\t"), b"key\t")
        self.assertEqual(bscrypto.strip_key_text(b"x" * 70), b"x" * 64)

    def test_generate_raw_file(self):
        p = self.path("k")
        rc, out, err = cli("-g", p)
        self.assertEqual((rc, out, err), (0, b"", ""))
        data = read_bytes(p)
        self.assertEqual(len(data), 32)
        self.assertTrue(set(data.decode()) <= set(bscrypto.PASSPHRASE_ALPHABET))
        self.assertEqual(stat.S_IMODE(os.stat(p).st_mode), 0o600)

    def test_generate_base64_and_show(self):
        p = self.path("k")
        self.assertEqual(cli("-b", "-g", p)[0], 0)
        self.assertEqual(len(read_bytes(p)), 43)
        rc, out, _ = cli("-b", "-k", p)
        self.assertEqual(rc, 0)
        self.assertEqual(len(out), 33)
        self.assertEqual(out, bscrypto.b64decode(read_bytes(p)) + b"\n")

    def test_generate_wrapped_and_show(self):
        kek = self.path("kek")
        key = self.path("key")
        self.assertEqual(cli("-g", kek)[0], 0)
        self.assertEqual(cli("-g", key, "-w", kek)[0], 0)
        self.assertEqual(len(read_bytes(key)), 54)
        rc, out, err = cli("-k", key, "-w", kek)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(len(out), 33)
        self.assertTrue(set(out[:-1].decode()) <= set(bscrypto.PASSPHRASE_ALPHABET))

    def test_generate_to_stdout(self):
        rc, out, _ = cli("-g", "-")
        self.assertEqual(rc, 0)
        self.assertEqual(len(out), 33)
        self.assertTrue(out.endswith(b"\n"))
        rc, out, _ = cli("generate", "-", "-b")
        self.assertEqual(len(out), 44)

    def test_never_overwrites_without_force(self):
        p = self.write("k", b"precious-kek")
        rc, out, err = cli("-g", p)
        self.assertEqual(rc, bscrypto.EXIT_KEY_FILE)
        self.assertIn("--force", err)
        self.assertEqual(read_bytes(p), b"precious-kek")
        self.assertEqual(cli("-g", p, "--force")[0], 0)
        self.assertEqual(len(read_bytes(p)), 32)  # truncated, no stale tail

    def test_empty_existing_file_is_replaced(self):
        p = self.write("k", b"", mode=0o644)
        self.assertEqual(cli("-g", p)[0], 0)
        self.assertEqual(stat.S_IMODE(os.stat(p).st_mode), 0o600)

    def test_show_from_stdin_prompts_like_bareos(self):
        rc, out, _ = cli("-k", "-", stdin=b"abc\n")
        self.assertEqual(out, bscrypto.KEY_PROMPT.encode() + b"abc\n")
        rc, out, _ = cli("show", "-", stdin=b"abc\n")
        self.assertEqual(out, b"abc\n")  # subcommand: prompt only on a terminal

    def test_wrong_kek_one_line_nonzero(self):
        kek, other, key = self.path("kek"), self.path("other"), self.path("key")
        for p in (kek, other):
            cli("-g", p)
        cli("-g", key, "-w", kek)
        secret = read_bytes(key).decode()
        rc, out, err = cli("-k", key, "-w", other)
        self.assertEqual(rc, bscrypto.EXIT_UNWRAP)
        self.assertEqual(out, b"")
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("integrity check failed", err)
        self.assertIn(key, err)
        self.assertNotIn(secret, err)
        self.assertNotIn(read_bytes(other).decode(), err)

    def test_truncated_or_garbage_wrapped_key(self):
        kek, key = self.path("kek"), self.path("key")
        cli("-g", kek)
        cli("-g", key, "-w", kek)
        wrapped = read_bytes(key)
        for bad, code in ((wrapped[:40], bscrypto.EXIT_KEY_FILE),
                          (wrapped[:-4] + b"*!*!", bscrypto.EXIT_KEY_FILE),
                          (wrapped[:50] + b"AAAA", bscrypto.EXIT_UNWRAP)):
            self.write("bad", bad)
            rc, out, err = cli("-k", self.path("bad"), "-w", kek)
            self.assertEqual(rc, code, err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(err.count("\n"), 1)

    def test_missing_files(self):
        rc, _, err = cli("-k", self.path("nope"))
        self.assertEqual(rc, bscrypto.EXIT_KEY_FILE)
        self.assertIn("cannot read key file", err)
        rc, _, err = cli("-g", self.path("k"), "-w", self.path("nokek"))
        self.assertEqual(rc, bscrypto.EXIT_KEY_FILE)
        self.assertIn("KEK file", err)
        self.assertFalse(os.path.exists(self.path("k")))

    def test_debug_output_has_no_key_material(self):
        kek, key = self.path("kek"), self.path("key")
        cli("-g", kek)
        rc, out, err = cli("-d", "100", "-g", key, "-w", kek)
        self.assertEqual(rc, 0)
        self.assertNotIn(read_bytes(key).decode(), err)
        self.assertNotIn(read_bytes(kek).decode(), err)


# ---------------------------------------------------------------------------
# Crypto cache
# ---------------------------------------------------------------------------

# (cache tests)


# ---------------------------------------------------------------------------
# SCSI transport, SSC pages and the emulated drive
# ---------------------------------------------------------------------------

# (drive tests)


# ---------------------------------------------------------------------------
# Volume label and disaster recovery
# ---------------------------------------------------------------------------

def build_label_block(VolumeName="Vol0001", PrevVolumeName="", PoolName="Full", PoolType="Backup",
                      MediaType="LTO-8", HostName="backup1", LabelProg="bareos-sd",
                      ProgVersion="Ver. 23.0.1 21 December 2023",
                      ProgDate="Build Dec 21 2023 10:00:00", Id=b"Bareos 2.0 immortal\n",
                      VerNum=20, label_btime=1700000000123456, write_btime=1700000000654321,
                      label_date=2460000.0, label_time=0.5, FileIndex=-2, Stream=0,
                      BlockNumber=0, VolSessionId=0, VolSessionTime=0, block_id=b"BB02",
                      checksum=None, data_len=None, block_len=None, pad=0):
    """A volume label block serialised the way Bareos's CreateVolumeLabelRecord,
    WriteRecordToBlock and SerBlockHeader do (test-side builder: we never write
    tapes).  Strings may be str or bytes; checksum=None computes the CRC."""
    import struct
    import zlib

    def c_string(value):
        return (value.encode() if isinstance(value, str) else value) + b"\0"

    data = c_string(Id) + struct.pack(">I", VerNum)
    if VerNum >= 11:
        data += struct.pack(">qq", label_btime, write_btime)
    else:
        data += struct.pack(">dd", label_date, label_time)
    data += struct.pack(">dd", 0.0, 0.0)
    for value in (VolumeName, PrevVolumeName, PoolName, PoolType, MediaType, HostName,
                  LabelProg, ProgVersion, ProgDate):
        data += c_string(value)
    length = len(data) if data_len is None else data_len
    if block_id == b"BB01":
        record = struct.pack(">IIiiI", VolSessionId, VolSessionTime, FileIndex, Stream, length)
        header_rest = b""
    else:
        record = struct.pack(">iiI", FileIndex, Stream, length)
        header_rest = struct.pack(">II", VolSessionId, VolSessionTime)
    size = 12 + len(block_id) + len(header_rest) + len(record) + len(data)
    size = size if block_len is None else block_len
    body = struct.pack(">I", size) + struct.pack(">I", BlockNumber) + block_id + header_rest
    body += record + data
    crc = zlib.crc32(body) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack(">I", crc) + body + b"\0" * pad


def recrc(block):
    """The block with its CRC recomputed over its header's block_len."""
    import struct
    import zlib
    block = bytes(block)
    if len(block) < 8:
        return block
    (length,) = struct.unpack_from(">I", block, 4)
    return struct.pack(">I", zlib.crc32(block[4:length]) & 0xFFFFFFFF) + block[4:]


LABEL_FIXTURE = ("label", "bareos-18.2.7-prelabel.block")


class TestVolumeLabel(unittest.TestCase):
    """FORMATS.md section 7; the real block is the reference fixture."""

    def parse(self, data, **kw):
        return bscrypto.parse_label_block(data, **kw)

    def fails(self, data, text=None, **kw):
        with self.assertRaises(bscrypto.BscryptoError) as cm:
            self.parse(data, **kw)
        self.assertEqual(cm.exception.exit_code, bscrypto.EXIT_LABEL)
        if text:
            self.assertIn(text, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))
        return str(cm.exception)

    def test_real_block_every_field(self):
        need_fixtures(self)
        label = self.parse(read_bytes(fixture(*LABEL_FIXTURE)))
        self.assertEqual(label.Id, "Bareos 2.0 immortal\n")
        self.assertEqual((label.VerNum, label.LabelType, label.LabelSize), (20, -1, 168))
        self.assertEqual(label.VolumeName, "freebsd-18.2.7")
        self.assertEqual(label.PrevVolumeName, "")
        self.assertEqual((label.PoolName, label.PoolType, label.MediaType),
                         ("Scratch", "Backup", "File"))
        self.assertEqual((label.HostName, label.LabelProg), ("freebsd", "freebsd-sd"))
        self.assertEqual(label.ProgVersion, "Ver. 18.2.7 12 December 2019")
        self.assertEqual(label.ProgDate, "Build Dec 12 2019 17:09:41")
        self.assertEqual((label.label_btime, label.write_btime), (1581061370417116, 1581061370417207))
        self.assertEqual((label.write_date, label.write_time), (0.0, 0.0))
        self.assertEqual((label.label_date, label.label_time), (None, None))
        b = label.block
        self.assertEqual((b.Id, b.CheckSum, b.BlockCheckSum), ("BB02", 0xCB678DDD, 0xCB678DDD))
        self.assertEqual((b.block_len, b.BlockNumber, b.VolSessionId, b.VolSessionTime), (204, 0, 0, 0))
        r = label.record
        self.assertEqual((r.FileIndex, r.Stream, r.data_len), (-1, 0, 168))

    def test_builder_reproduces_the_real_block(self):
        # The test builder is checked against Bareos's own bytes before it builds anything else.
        need_fixtures(self)
        built = build_label_block("freebsd-18.2.7", "", "Scratch", "Backup", "File", "freebsd",
                                  "freebsd-sd", "Ver. 18.2.7 12 December 2019",
                                  "Build Dec 12 2019 17:09:41", FileIndex=-1,
                                  label_btime=1581061370417116, write_btime=1581061370417207)
        self.assertEqual(built, read_bytes(fixture(*LABEL_FIXTURE)))

    def test_vol_label_and_pre_label(self):
        self.assertEqual(self.parse(build_label_block(FileIndex=-2)).LabelType, bscrypto.VOL_LABEL)
        self.assertEqual(self.parse(build_label_block(FileIndex=-1)).LabelType, bscrypto.PRE_LABEL)
        self.assertIn("VOL_LABEL (in use", bscrypto.format_volume_label(
            self.parse(build_label_block(FileIndex=-2))))

    def test_other_first_records_are_not_labels(self):
        self.fails(build_label_block(FileIndex=-4), "FileIndex -4 (SOS_LABEL)")
        self.fails(build_label_block(FileIndex=17), "FileIndex 17 (a data record)")

    def test_bacula_ids_and_old_versions(self):
        label = self.parse(build_label_block(Id=b"Bacula 1.0 immortal\n", VerNum=11))
        self.assertEqual((label.Id, label.VerNum), ("Bacula 1.0 immortal\n", 11))
        self.assertEqual(label.label_btime, 1700000000123456)
        old = self.parse(build_label_block(Id=b"Bacula 0.9 mortal\n", VerNum=10,
                                           label_date=2452000.0, label_time=0.25))
        self.assertEqual((old.label_date, old.label_time, old.label_btime), (2452000.0, 0.25, None))
        self.assertIn("Julian day", bscrypto.format_volume_label(old))

    def test_wrong_id(self):
        for bad in (b"Bareos 2.0 immortal", b"Bareos 3.0 immortal\n", b"", b"x" * 31):
            self.fails(build_label_block(Id=bad), "not a Bareos volume: label Id is")
        self.fails(build_label_block(Id=b"x" * 40), "Id in the label is 40 bytes")

    def test_unknown_version(self):
        msg = self.fails(build_label_block(VerNum=21, VolumeName="Tape7"), "label version 21")
        self.assertIn("'Tape7'", msg)

    def test_empty_strings(self):
        label = self.parse(build_label_block("", "", "", "", "", "", "", "", ""))
        self.assertEqual([getattr(label, n) for n, _ in bscrypto._LABEL_STRINGS], [""] * 9)

    def test_maximum_lengths(self):
        # Volume_Label arrays: MAX_NAME_LENGTH 128 and 50 bytes, NUL included.
        for name, size in bscrypto._LABEL_STRINGS:
            ok = self.parse(build_label_block(**{name: "n" * (size - 1)}))
            self.assertEqual(getattr(ok, name), "n" * (size - 1))
            self.fails(build_label_block(**{name: "n" * size}),
                       "%s in the label is %d bytes; Bareos writes at most %d" % (name, size, size - 1))

    def test_bad_crc(self):
        block = bytearray(build_label_block(VolumeName="Tape42"))
        block[-3] ^= 0x01
        msg = self.fails(bytes(block), "CRC-32 mismatch")
        self.assertIn("'Tape42'", msg)            # still says which volume it claims to be
        self.assertEqual(self.parse(bytes(block), check_crc=False).VolumeName, "Tape42")
        wrong = build_label_block(checksum=0x12345678)
        self.fails(wrong, "stored 12345678")

    def test_checksum_off_is_accepted(self):
        # Device "Block Checksum = no" writes 0 and Bareos does not check.
        label = self.parse(build_label_block(checksum=0))
        self.assertEqual(label.block.CheckSum, 0)
        self.assertIn("not written", bscrypto.format_volume_label(label))

    def test_truncated_at_every_offset(self):
        block = build_label_block()
        for n in range(len(block)):
            msg = self.fails(block[:n])
            if n >= 24:
                self.assertIn("truncated", msg)

    def test_padded_tape_block(self):
        label = self.parse(build_label_block(pad=64512 - 300))
        self.assertEqual(label.VolumeName, "Vol0001")

    def test_bb01_block(self):
        label = self.parse(build_label_block(block_id=b"BB01", VolSessionId=5, VolSessionTime=9))
        self.assertEqual((label.block.Id, label.record.VolSessionId, label.record.VolSessionTime),
                         ("BB01", 5, 9))
        self.assertEqual(label.VolumeName, "Vol0001")

    def test_record_longer_than_block(self):
        self.fails(build_label_block(data_len=5000), "does not fit")
        self.fails(build_label_block(data_len=10), "ends inside")

    def test_impossible_block_length(self):
        self.fails(build_label_block(block_len=20), "impossible block length 20")
        self.fails(build_label_block(block_len=20000001), "impossible block length")

    def test_foreign_data(self):
        tar = bytearray(1024)
        tar[:8] = b"etc/motd"
        tar[257:263] = b"ustar\0"
        self.fails(bytes(tar), "a tar archive")
        self.fails(b"VOL1ABC123" + b" " * 70, "ANSI tape label (VOL1, volume serial 'ABC123')")
        self.fails("VOL1XYZ999".encode("cp500") + b"\x40" * 70, "IBM (EBCDIC) tape label")
        self.fails(bytes(512), "512 zero bytes")
        self.fails(b"\x1f\x8b\x08\x00" + bytes(60), "1f 8b 08 00")
        self.fails(b"BB0", "block too short: 3 bytes")

    def test_fuzz_only_bscrypto_errors(self):
        """Random mutations (fixed seed) of the real and built blocks: the parser
        returns a label or raises BscryptoError, and a label always renders."""
        import json
        rng = random.Random(20)
        seeds = [build_label_block(), build_label_block(block_id=b"BB01"),
                 build_label_block(Id=b"Bacula 0.9 mortal\n", VerNum=9)]
        if os.path.isdir(FIXTURES):
            seeds.append(read_bytes(fixture(*LABEL_FIXTURE)))
        parsed = failed = 0
        for _ in range(3000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                pos = rng.randrange(len(data) + 1)
                if op < 0.5 and data:
                    data[min(pos, len(data) - 1)] = rng.getrandbits(8)
                elif op < 0.7:
                    data[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
                elif op < 0.85:
                    del data[pos:pos + rng.randint(1, 8)]
                else:
                    data = data[:pos]
            if rng.random() < 0.7:
                data = recrc(data)     # get past the CRC to reach the field parsing
            try:
                label = bscrypto.parse_label_block(bytes(data), check_crc=rng.random() < 0.5)
            except bscrypto.BscryptoError as e:
                failed += 1
                self.assertEqual(e.exit_code, bscrypto.EXIT_LABEL)
                continue
            parsed += 1
            bscrypto.format_volume_label(label, "fuzz")
            json.dumps(bscrypto.volume_label_dict(label), allow_nan=False)
        self.assertGreater(parsed, 100)
        self.assertGreater(failed, 1000)

    def test_json_and_text_rendering(self):
        label = self.parse(build_label_block(VolumeName="A1", label_btime=-(10 ** 18)))
        text = bscrypto.format_volume_label(label, "/dev/nst0")
        self.assertTrue(text.startswith("Volume label of /dev/nst0:\n   VolumeName     : A1\n"))
        self.assertIn("(out of range)", text)
        d = bscrypto.volume_label_dict(label)
        self.assertEqual((d["VolumeName"], d["LabelTypeName"], d["block"]["crc_ok"]),
                         ("A1", "VOL_LABEL", True))
        self.assertEqual(d["write_btime"], 1700000000654321)

    def test_local_time_shown(self):
        label = self.parse(build_label_block(label_btime=1700000000123456))
        import time
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1700000000))
        self.assertIn("label_btime    : %s" % local, bscrypto.format_volume_label(label))
        self.assertIn("(1700000000123456 us)", bscrypto.format_volume_label(label))


class TestLabelCommand(TempDirTestCase):
    def test_label_of_a_file(self):
        need_fixtures(self)
        rc, out, err = cli("label", fixture(*LABEL_FIXTURE))
        self.assertEqual((rc, err), (0, ""))
        self.assertIn(b"   VolumeName     : freebsd-18.2.7\n", out)
        self.assertIn(b"   CRC-32         : cb678ddd, correct\n", out)

    def test_json_and_name(self):
        import json
        p = self.write("vol", build_label_block(VolumeName="Full-0042") + b"more data" * 1000)
        rc, out, _ = cli("label", "--json", p)
        self.assertEqual(rc, 0)
        self.assertEqual(json.loads(out.decode())["VolumeName"], "Full-0042")
        self.assertEqual(cli("label", "--name", p)[1], b"Full-0042\n")
        self.assertNotEqual(cli("label", "--name", "--json", p)[0], 0)

    def test_large_block_in_a_file(self):
        # Longer than the first 64 KiB read: the rest of the block is read too.
        size = len(build_label_block()) + 100000
        p = self.write("vol", recrc(build_label_block(block_len=size) + bytes(100000)))
        self.assertEqual(cli("label", "--name", p)[1], b"Vol0001\n")

    def test_stdin(self):
        rc, out, _ = cli("label", "--name", "-", stdin=build_label_block(VolumeName="Piped"))
        self.assertEqual((rc, out), (0, b"Piped\n"))
        rc, _, err = cli("label", "-", stdin=b"")
        self.assertEqual((rc, err), (bscrypto.EXIT_LABEL, "bscrypto: no data on stdin\n"))

    def test_failures(self):
        cases = [(self.write("empty", b""), bscrypto.EXIT_LABEL, "is empty"),
                 (self.write("text", b"hello world\n" * 10), bscrypto.EXIT_LABEL,
                  "not a Bareos volume"),
                 (self.path("missing"), bscrypto.EXIT_DEVICE, "cannot open"),
                 (self.tmp, bscrypto.EXIT_DEVICE, "neither a regular file nor a tape device")]
        for path, code, text in cases:
            rc, out, err = cli("label", path)
            self.assertEqual(rc, code, err)
            self.assertIn(text, err)
            self.assertEqual(err.count("\n"), 1)
            self.assertIn(path, err)

    def test_char_device_that_is_not_a_tape(self):
        if not sys.platform.startswith("linux") or not os.path.exists("/dev/null"):
            self.skipTest("needs Linux /dev/null")
        rc, _, err = cli("label", "/dev/null")
        self.assertEqual(rc, bscrypto.EXIT_DEVICE)
        self.assertIn("not a tape device", err)


class FakeTape(object):
    """A tape node for read_first_block: records every call; has no write."""

    platform = "linux"

    def __init__(self, block=b"", read_error=None, open_error=None, rewind_errors=(),
                 block_size=0, rdev=None):
        self.block = block
        self.read_error = read_error
        self.open_error = open_error
        self.rewind_errors = list(rewind_errors)
        self.block_size = block_size
        self.rdev = os.makedev(bscrypto.ST_MAJOR, 128) if rdev is None else rdev
        self.calls = []

    def stat(self, path):
        import types
        self.calls.append(("stat", path))
        return types.SimpleNamespace(st_mode=stat.S_IFCHR | 0o660, st_rdev=self.rdev)

    def open(self, path, flags):
        self.calls.append(("open", path, flags))
        if self.open_error:
            raise OSError(self.open_error, os.strerror(self.open_error))
        return 7

    def ioctl(self, fd, request, arg):
        import struct
        if request == bscrypto.mtioctop_request():
            op, count = struct.unpack("@hi", arg)
            self.calls.append(("MTIOCTOP", op, count))
            if self.rewind_errors:
                err = self.rewind_errors.pop(0)
                if err:
                    raise OSError(err, os.strerror(err))
            return arg
        if request == bscrypto.mtiocget_request():
            self.calls.append(("MTIOCGET",))
            return struct.pack("@5l2i", 1, 0, self.block_size, 0, 0, 0, 0)
        self.calls.append(("ioctl", request))
        raise OSError(25, "Inappropriate ioctl for device")

    def read(self, fd, size):
        self.calls.append(("read", fd, size))
        if self.read_error:
            raise OSError(self.read_error, os.strerror(self.read_error))
        return self.block[:size]

    def close(self, fd):
        self.calls.append(("close", fd))


class TestLabelFromTape(unittest.TestCase):
    REWIND = ("MTIOCTOP", 6, 1)

    def label(self, tape, path="/dev/nst0"):
        return bscrypto.read_volume_label(path, ops=tape)

    def fails(self, tape, code, text):
        with self.assertRaises(bscrypto.BscryptoError) as cm:
            self.label(tape)
        self.assertEqual(cm.exception.exit_code, code, str(cm.exception))
        self.assertIn(text, str(cm.exception))
        return tape

    def test_rewind_read_rewind_read_only(self):
        tape = FakeTape(build_label_block(VolumeName="LTO123", pad=64512 - 300))
        self.assertEqual(self.label(tape).VolumeName, "LTO123")
        self.assertEqual(tape.calls, [("stat", "/dev/nst0"), ("open", "/dev/nst0", os.O_RDONLY),
                                      self.REWIND, ("read", 7, 262144), self.REWIND, ("close", 7)])

    def test_request_numbers(self):
        import struct
        self.assertEqual(bscrypto.mtioctop_request("x86_64"), 0x40086D01)
        self.assertEqual(bscrypto.mtioctop_request("aarch64"), 0x40086D01)
        self.assertEqual(bscrypto.mtioctop_request("ppc64le"), 0x80086D01)
        self.assertEqual(bscrypto.mtioctop_request("mips"), 0x80086D01)
        if struct.calcsize("@5l2i") == 48:
            self.assertEqual(bscrypto.mtiocget_request("x86_64"), 0x80306D02)
            self.assertEqual(bscrypto.mtiocget_request("ppc64"), 0x40306D02)
        self.assertEqual(struct.calcsize("@hi"), 8)

    def test_io_error_says_clear_the_key_and_still_rewinds(self):
        tape = self.fails(FakeTape(read_error=5), bscrypto.EXIT_LABEL,
                          "clear the drive key first (bscrypto clear-key /dev/nst0)")
        self.assertEqual(tape.calls[-2:], [self.REWIND, ("close", 7)])
        self.assertIn(("MTIOCGET",), tape.calls)      # only asked, never set

    def test_fixed_block_mode_is_reported_not_changed(self):
        import errno
        tape = self.fails(FakeTape(read_error=errno.EINVAL, block_size=1024), bscrypto.EXIT_LABEL,
                          "fixed-block mode (1024 bytes)")
        ops = [c for c in tape.calls if c[0] in ("MTIOCTOP", "ioctl")]
        self.assertEqual(ops, [self.REWIND, self.REWIND])    # no MTSETBLK (op 20)
        # A real st drive in fixed 1024-byte mode fails a 64,512-byte block with EIO
        # (seen in the systest guest): the block mode, not a key, is the cause named.
        with self.assertRaises(bscrypto.BscryptoError) as cm:
            self.label(FakeTape(read_error=errno.EIO, block_size=1024))
        self.assertIn("setblk 0", str(cm.exception))
        self.assertNotIn("clear-key", str(cm.exception))

    def test_block_too_large_in_variable_mode(self):
        import errno
        self.fails(FakeTape(read_error=errno.ENOMEM), bscrypto.EXIT_LABEL, "larger than 262144")

    def test_blank_tape(self):
        self.fails(FakeTape(b""), bscrypto.EXIT_LABEL, "blank or starts with a filemark")

    def test_not_a_bareos_tape(self):
        self.fails(FakeTape(b"VOL1ABC123" + b" " * 70), bscrypto.EXIT_LABEL, "/dev/nst0: not a Bareos")

    def test_open_errors(self):
        import errno
        if hasattr(errno, "ENOMEDIUM"):
            self.fails(FakeTape(open_error=errno.ENOMEDIUM), bscrypto.EXIT_NOT_READY, "no tape in")
        self.fails(FakeTape(open_error=errno.EBUSY), bscrypto.EXIT_DEVICE, "busy")
        self.fails(FakeTape(open_error=errno.EACCES), bscrypto.EXIT_DEVICE, "Permission denied")
        self.fails(FakeTape(open_error=errno.EIO), bscrypto.EXIT_NOT_READY, "not ready")

    def test_rewind_errors(self):
        import errno
        tape = self.fails(FakeTape(rewind_errors=[errno.ENOTTY]), bscrypto.EXIT_DEVICE,
                          "not a tape device")
        self.assertNotIn(("read", 7, 262144), tape.calls)
        self.assertEqual(tape.calls[-1], ("close", 7))
        self.fails(FakeTape(rewind_errors=[errno.EIO]), bscrypto.EXIT_NOT_READY, "cannot rewind")

    def test_failed_rewind_after_reading_warns(self):
        import errno
        tape = FakeTape(build_label_block(), rewind_errors=[0, errno.EIO])
        err = io.StringIO()
        saved, sys.stderr = sys.stderr, err
        try:
            self.assertEqual(self.label(tape).VolumeName, "Vol0001")
        finally:
            sys.stderr = saved
        self.assertIn("warning: label read, but rewinding afterwards failed", err.getvalue())

    def test_sg_node_and_other_systems(self):
        tape = self.fails(FakeTape(rdev=os.makedev(bscrypto.SG_MAJOR, 0)), bscrypto.EXIT_DEVICE,
                          "SCSI generic node")
        self.assertEqual([c[0] for c in tape.calls], ["stat"])
        bsd = FakeTape(build_label_block())
        bsd.platform = "freebsd13"
        self.fails(bsd, bscrypto.EXIT_DEVICE, "dd if=/dev/nst0 of=label.block bs=256k count=1")
        self.assertEqual([c[0] for c in bsd.calls], ["stat"])

    def test_op_label_prints(self):
        out = io.StringIO()
        rc = bscrypto.op_label("/dev/nst0", name_only=True, ops=FakeTape(build_label_block()), out=out)
        self.assertEqual((rc, out.getvalue()), (0, "Vol0001\n"))


SD_CONF = r'''
# bareos-sd.conf as the packages ship it, plus a KEK
Storage {
  Name = bareos-sd
  Maximum Concurrent Jobs = 20
}

Director {
  Name = bareos-dir
  Password = "s3cr3t"
  Key Encryption Key = "%s"   # 32-character generated passphrase
}

Director {
  Name = bareos-mon
  Password = "m0n"
  Monitor = yes
}

Device {
  Name = tapedrive-0
  Media Type = LTO
  Archive Device = /dev/nst0
  Maximum Block Size = 1048576
}

Messages {
  Name = Standard
  Director = bareos-dir = all
}
'''
# A generated-looking KEK using the awkward characters of Bareos's alphabet.
KEK = "x#9;Q{a}=,b@c|d[e]~f/g?h<i>j!k%l"


class TestKekFromConfig(TempDirTestCase):
    def conf(self, name, text):
        p = self.path(name)
        d = os.path.dirname(p)
        if not os.path.isdir(d):
            os.makedirs(d)
        with open(p, "w") as f:
            f.write(text)
        return p

    def kek(self, text, director=None):
        return bscrypto.kek_from_config(self.conf("bareos-sd.conf", text), director)

    def test_packaged_sd_conf(self):
        self.assertEqual(self.kek(SD_CONF % KEK), KEK.encode())

    def test_dir_conf_with_nested_blocks(self):
        text = r'''
Director {                            # the director's own resource
  Name = "backup-dir"
  QueryFile = "/usr/lib/bareos/scripts/query.sql"
  DirAddresses = {
    ip = { addr = 192.0.2.1; port = 9101 }
  }
  Password = "pw"
  KeyEncryptionKey = "%s"
}
FileSet {
  Name = "LinuxAll"
  Include {
    Options { Signature = MD5; One FS = No }
    File = "/"
  }
}
Job { Name = x; Client = y }
''' % KEK
        self.assertEqual(self.kek(text), KEK.encode())

    def test_keyword_spellings(self):
        for keyword in ("Key Encryption Key", "KeyEncryptionKey", "key encryption key",
                        "KEY  ENCRYPTION\tKEY", "keyencryptionKEY"):
            text = "Director {\n Name = d\n %s = \"k1\"\n}\n" % keyword
            self.assertEqual(self.kek(text), b"k1", keyword)
        text = "Director {\n Name = d\n Key-Encryption-Key = \"k1\"\n}\n"
        self.assertRaises(bscrypto.KeyFileError, self.kek, text)

    def test_quoting_escapes_and_comments(self):
        cases = [
            (r'"a\"b\\c"', b'a"b\\c'),
            (r'"with # and ; inside"', b"with # and ; inside"),
            ('"abc" "def"', b"abcdef"),
            ('"abc"\n   "def"', b"abcdef"),
            ("plainvalue # comment", b"plainvalue"),
            ("x9-y_z.w # comment", b"x9-y_z.w"),
            ("abc def-1", b"abcdef-1"),         # Bareos drops spaces inside a leading run of letters
            ('"sp ace "', b"sp ace "),
            ('"\\q"', b"q"),
        ]
        for value, expected in cases:
            text = "Director {\n  Name = d\n  Key Encryption Key = %s\n}\n" % value
            self.assertEqual(self.kek(text), expected, value)

    def test_comments_and_semicolons(self):
        text = ('# Director { Name = old; Key Encryption Key = "wrong" }\n'
                'Director { Name = d; Password = "p#q"; Key Encryption Key = "right" } # done\n')
        self.assertEqual(self.kek(text), b"right")
        text = 'Director\n{\n  Name = d\n  Key Encryption Key = "own-line-brace"\n}\n'
        self.assertEqual(self.kek(text), b"own-line-brace")
        # Bareos's lexer knows only '#': a // or /* */ line is not a directive
        # (Bareos rejects it), so it cannot supply a KEK either.
        text = ('Director {\n  Name = d\n  // Key Encryption Key = "slashes"\n'
                '  /* Key Encryption Key = "c-style" */\n  Key Encryption Key = "real"\n}\n')
        self.assertEqual(self.kek(text), b"real")

    def test_kek_outside_a_director_is_ignored(self):
        text = ('Storage { Name = s; Key Encryption Key = "not-here" }\n'
                'Director { Name = d; Password = x }\n')
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            self.kek(text)
        self.assertIn("no Key Encryption Key in", str(cm.exception))

    def test_directory_layouts(self):
        root = self.path("etc-bareos")
        self.conf("etc-bareos/bareos-sd.d/director/bareos-dir.conf",
                  'Director {\n  Name = bareos-dir\n  Key Encryption Key = "%s"\n}\n' % KEK)
        self.conf("etc-bareos/bareos-sd.d/director/bareos-mon.conf",
                  "Director { Name = bareos-mon; Password = x; Monitor = yes }\n")
        self.conf("etc-bareos/bareos-sd.d/storage/bareos-sd.conf", "Storage { Name = bareos-sd }\n")
        self.conf("etc-bareos/bareos-dir.d/director/bareos-dir.conf",
                  'Director {\n  Name = bareos-dir\n  KeyEncryptionKey = "%s"\n}\n' % KEK)
        for path in (root, os.path.join(root, "bareos-sd.d"),
                     os.path.join(root, "bareos-sd.d", "director"),
                     os.path.join(root, "bareos-dir.d"),
                     os.path.join(root, "bareos-sd.d", "director", "bareos-dir.conf")):
            self.assertEqual(bscrypto.kek_from_config(path), KEK.encode(), path)
        files = bscrypto.config_files(root)
        self.assertEqual([os.path.relpath(f, root) for f in files],
                         ["bareos-sd.d/director/bareos-dir.conf",
                          "bareos-sd.d/director/bareos-mon.conf",
                          "bareos-sd.d/storage/bareos-sd.conf",
                          "bareos-dir.d/director/bareos-dir.conf"])

    def test_single_file_wins_over_its_directory(self):
        # Bareos reads bareos-sd.conf when it exists and ignores bareos-sd.d then.
        root = self.path("etc")
        self.conf("etc/bareos-sd.conf", 'Director { Name = d; Key Encryption Key = "file" }\n')
        self.conf("etc/bareos-sd.d/director/d.conf",
                  'Director { Name = d; Key Encryption Key = "stale" }\n')
        self.assertEqual(bscrypto.kek_from_config(root), b"file")

    def test_several_directors(self):
        text = ('Director { Name = alpha; Key Encryption Key = "kek-a" }\n'
                'Director { Name = beta; Key Encryption Key = "kek-b" }\n'
                'Director { Name = gamma; Password = x }\n')
        with self.assertRaises(bscrypto.UsageError) as cm:
            self.kek(text)
        self.assertEqual(str(cm.exception), "several directors have a Key Encryption Key: alpha, "
                                            "beta; choose one with --director")
        self.assertEqual(self.kek(text, "beta"), b"kek-b")
        self.assertEqual(self.kek(text, "ALPHA"), b"kek-a")     # exact name first, then any case
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            self.kek(text, "gamma")
        self.assertIn("directors with one: alpha, beta", str(cm.exception))
        same = text.replace("kek-b", "kek-a")
        self.assertEqual(self.kek(same), b"kek-a")              # one key: nothing to choose

    def test_one_director_two_different_keks(self):
        root = self.path("etc")
        self.conf("etc/bareos-sd.conf", 'Director { Name = d; Key Encryption Key = "one" }\n')
        self.conf("etc/bareos-dir.conf", 'Director { Name = d; Key Encryption Key = "two" }\n')
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            bscrypto.kek_from_config(root)
        self.assertIn("different Key Encryption Keys", str(cm.exception))
        self.assertIn("bareos-sd.conf line 1", str(cm.exception))

    def test_missing_kek_and_missing_files(self):
        self.assertRaises(bscrypto.KeyFileError, self.kek, "Director { Name = d; Password = p }\n")
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            bscrypto.kek_from_config(self.path("nope.conf"))
        self.assertIn("cannot read", str(cm.exception))
        os.mkdir(self.path("emptydir"))
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            bscrypto.kek_from_config(self.path("emptydir"))
        self.assertIn("no Bareos configuration files", str(cm.exception))
        self.assertRaises(bscrypto.KeyFileError, self.kek,
                          'Director { Name = d; Key Encryption Key = "" }\n')

    def test_includes_are_reported_not_followed(self):
        text = ('@/etc/bareos/extra.conf\n'
                'Director {\n  Name = d\n  @"/etc/bareos/dir kek.conf"\n}\n'
                '@|"sh -c \'cat /etc/bareos/*.conf\'"\n')
        with self.assertRaises(bscrypto.KeyFileError) as cm:
            self.kek(text)
        msg = str(cm.exception)
        self.assertIn("bareos-sd.conf line 1: @/etc/bareos/extra.conf", msg)
        self.assertIn("line 4: @/etc/bareos/dir kek.conf", msg)
        self.assertIn("line 6: @|sh -c 'cat /etc/bareos/*.conf'", msg)
        warnings = []
        p = self.conf("with-kek.conf", text + 'Director { Name = e; Key Encryption Key = "k" }\n')
        found = bscrypto.find_config_kek(p, warn=warnings.append)
        self.assertEqual(found.kek, b"k")
        self.assertEqual(len(warnings), 1)
        self.assertIn("not followed: %s line 1: @/etc/bareos/extra.conf" % p, warnings[0])

    def test_syntax_errors_name_the_line(self):
        for text, line, what in (('Director { Name = d\n Key Encryption Key = "open\n', 2, "never closed"),
                                 ("Director { Name = d\n", 1, "never closed"),
                                 ("Name = d }\n", 1, "without a matching")):
            with self.assertRaises(bscrypto.KeyFileError) as cm:
                self.kek(text)
            self.assertIn("bareos-sd.conf line %d: " % line, str(cm.exception))
            self.assertIn(what, str(cm.exception))

    def test_bytes_kept_bom_and_crlf(self):
        p = self.path("bareos-sd.conf")
        with open(p, "wb") as f:
            f.write(b'\xef\xbb\xbfDirector {\r\n Name = d\r\n Key Encryption Key = "k\xc3\xa9y"\r\n}\r\n')
        self.assertEqual(bscrypto.kek_from_config(p), b"k\xc3\xa9y")
        with open(p, "wb") as f:
            f.write("Director { }".encode("utf-16"))
        self.assertRaises(bscrypto.KeyFileError, bscrypto.kek_from_config, p)

    def test_config_kek_unwraps_what_bareos_wrapped(self):
        # The KEK read from the config equals the one a KEK file gives Bareos.
        p = self.conf("bareos-sd.conf", SD_CONF % KEK)
        wrapped = bscrypto.wrap_passphrase(KEK.encode(), b"P" * 32)
        self.assertEqual(bscrypto.unwrap_passphrase(bscrypto.kek_from_config(p), wrapped), b"P" * 32)
        need_fixtures(self)
        kek_text = read_bytes(fixture("keys", "kek.key"))
        p = self.conf("fixture.conf", 'Director { Name = d; Key Encryption Key = "%s" }\n'
                      % kek_text.decode().replace("\\", "\\\\").replace('"', '\\"'))
        self.assertEqual(bscrypto.kek_from_config(p), kek_text)

    def test_kek_from_arguments(self):
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--kek")
        bscrypto.add_kek_from_arguments(parser)
        conf = self.conf("bareos-sd.conf", SD_CONF % KEK)
        keyfile = self.write("kek.key", b"file-kek\n")
        self.assertEqual(bscrypto.kek_from_arguments(parser.parse_args(["--kek-from", conf])),
                         KEK.encode())
        self.assertEqual(bscrypto.kek_from_arguments(parser.parse_args(["--kek", keyfile])), b"file-kek")
        self.assertIsNone(bscrypto.kek_from_arguments(parser.parse_args([])))
        for args in (["--kek", keyfile, "--kek-from", conf], ["--director", "x"]):
            self.assertRaises(bscrypto.UsageError, bscrypto.kek_from_arguments, parser.parse_args(args))

    def test_command_writes_private_file(self):
        conf = self.conf("bareos-sd.conf", SD_CONF % KEK)
        out = self.path("kek.key")
        rc, stdout, err = cli("kek-from-config", conf, "--out", out)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(read_bytes(out), KEK.encode())
        self.assertEqual(stat.S_IMODE(os.stat(out).st_mode), 0o600)
        self.assertNotIn(KEK.encode(), stdout)
        self.assertIn(b"Director 'bareos-dir'", stdout)
        rc, _, err = cli("kek-from-config", conf, "--out", out)
        self.assertEqual(rc, bscrypto.EXIT_KEY_FILE)
        self.assertIn("--force", err)
        self.assertEqual(cli("kek-from-config", conf, "--out", out, "--force")[0], 0)
        # The file works as a KEK file: wrap with it, unwrap with the config.
        wrapped = self.path("w.key")
        self.assertEqual(cli("-g", wrapped, "-w", out)[0], 0)
        plain = bscrypto.unwrap_passphrase(bscrypto.kek_from_config(conf), read_bytes(wrapped))
        self.assertEqual(cli("-k", wrapped, "-w", out)[1], plain + b"\n")

    def test_command_print_and_arguments(self):
        conf = self.conf("bareos-sd.conf", SD_CONF % KEK)
        self.assertEqual(cli("kek-from-config", conf, "--print"), (0, KEK.encode() + b"\n", ""))
        rc, out, err = cli("kek-from-config", conf)
        self.assertNotEqual(rc, 0)
        self.assertEqual(out, b"")
        self.assertIn("--out", err)
        rc, out, err = cli("kek-from-config", self.conf("two.conf",
                           'Director { Name = a; Key Encryption Key = "1" }\n'
                           'Director { Name = b; Key Encryption Key = "2" }\n'), "--print")
        self.assertEqual((rc, out), (bscrypto.EXIT_USAGE, b""))
        self.assertIn("choose one with --director", err)

    def test_command_refuses_a_kek_a_file_cannot_hold(self):
        conf = self.conf("bareos-sd.conf", 'Director { Name = d; Key Encryption Key = "short " }\n')
        rc, _, err = cli("kek-from-config", conf, "--out", self.path("k"))
        self.assertEqual(rc, bscrypto.EXIT_KEY_FILE)
        self.assertIn("ends in spaces", err)
        self.assertFalse(os.path.exists(self.path("k")))


B64_PLAIN = bscrypto.b64encode(b"p" * 32)                 # 43 characters
B64_WRAPPED = bscrypto.b64encode(b"w" * 40)               # 54 characters


class TestCatalogExport(TempDirTestCase):
    def parse(self, text):
        return bscrypto.parse_catalog_export(text, "export")

    def test_psql_unaligned_tuples_only(self):
        text = "Vol-0001|%s\nVol-0002|\nVol-0003|%s\n" % (B64_PLAIN, B64_WRAPPED)
        r = self.parse(text)
        self.assertEqual(r.entries, [("Vol-0001", B64_PLAIN), ("Vol-0003", B64_WRAPPED)])
        self.assertEqual((r.read, r.skipped, r.bad, r.format), (3, 1, [], "psql"))

    def test_psql_with_header_and_footer(self):
        text = "volumename|encryptionkey\nA|%s\nB|\n(2 rows)\n" % B64_PLAIN
        r = self.parse(text)
        self.assertEqual((r.entries, r.read, r.skipped), ([("A", B64_PLAIN)], 2, 1))

    def test_psql_aligned_output(self):
        text = (" volumename |                     encryptionkey\n"
                "------------+-----------------------------------------------------\n"
                " Full-0001  | %s\n"
                " Full-0002  | \n"
                "(2 rows)\n\n") % B64_WRAPPED
        r = self.parse(text)
        self.assertEqual((r.entries, r.read, r.skipped, r.bad), ([("Full-0001", B64_WRAPPED)], 2, 1, []))

    def test_csv_header_any_order_extra_columns(self):
        text = ('MediaId,"EncryptionKey",PoolId,VOLUMENAME\r\n'
                '1,%s,3,"Tape:01"\r\n'
                '2,,3,Tape02\r\n'
                '3,"%s",3,Tape03\r\n') % (B64_PLAIN, B64_WRAPPED)
        r = self.parse(text)
        self.assertEqual(r.entries, [("Tape:01", B64_PLAIN), ("Tape03", B64_WRAPPED)])
        self.assertEqual((r.read, r.skipped, r.bad, r.format), (3, 1, [], "csv"))

    def test_copy_csv_header_with_bom_from_file(self):
        p = self.write("media.csv", ("\ufeffvolumename,encryptionkey\nV1,%s\n" % B64_PLAIN)
                       .encode("utf-8"))
        r = bscrypto.read_catalog_export(p)
        self.assertEqual((r.entries, r.format), ([("V1", B64_PLAIN)], "csv"))

    def test_csv_without_header_and_tab_separated(self):
        self.assertEqual(self.parse("V1,%s\n" % B64_PLAIN).entries, [("V1", B64_PLAIN)])
        # mysql -B prints NULL, psql's \copy text format \N: both mean no key.
        r = self.parse("V1\t%s\nV2\tNULL\nV3\t\\N\nV4\tjunk*\n" % B64_PLAIN)
        self.assertEqual((r.entries, r.format), ([("V1", B64_PLAIN)], "tab-separated"))
        self.assertEqual((r.read, r.skipped, [n for n, _ in r.bad]), (4, 2, [4]))

    def test_bad_lines_carry_line_numbers(self):
        text = ("V1|%s\n"           # 1 good
                "V2|%s|extra\n"     # 2 three fields
                "|%s\n"             # 3 no volume
                "V4|not*base64\n"   # 4 bad characters
                "V5|%s\n"           # 5 wrong length
                "V1|%s\n"           # 6 repeats V1 with another key
                "V1|%s\n"           # 7 identical repeat: ignored
                ) % (B64_PLAIN, B64_PLAIN, B64_PLAIN, bscrypto.b64encode(b"x" * 16), B64_WRAPPED,
                     B64_PLAIN)
        r = self.parse(text)
        self.assertEqual(r.entries, [("V1", B64_PLAIN)])
        self.assertEqual([n for n, _ in r.bad], [2, 3, 4, 5, 6])
        self.assertIn("found 3", r.bad[0][1])
        self.assertIn("empty VolumeName", r.bad[1][1])
        self.assertIn("not base64", r.bad[2][1])
        self.assertIn("decodes to 16 bytes", r.bad[3][1])
        self.assertIn("also on line 1", r.bad[4][1])
        self.assertEqual(r.read, 7)

    def test_unusable_files(self):
        for text, message in (("", "is empty"), ("\n  \n", "is empty"),
                              ("justonecolumn\n", "cannot tell the columns"),
                              ("VolumeName,Key\nV,x\n", "must name both")):
            with self.assertRaises(bscrypto.KeyFileError) as cm:
                self.parse(text)
            self.assertIn(message, str(cm.exception))
        p = self.write("latin1", b"V\xe9|abc\n")
        self.assertRaises(bscrypto.KeyFileError, bscrypto.read_catalog_export, p)
        self.assertRaises(bscrypto.KeyFileError, bscrypto.read_catalog_export, self.path("none"))

    def test_stdin(self):
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(("V|%s\n" % B64_PLAIN).encode()))
        try:
            r = bscrypto.read_catalog_export("-")
        finally:
            sys.stdin = saved
        self.assertEqual(r.entries, [("V", B64_PLAIN)])

    def test_sql_quoting(self):
        self.assertEqual(bscrypto.sql_quote("O'Brien"), "'O''Brien'")
        self.assertEqual(bscrypto.sql_quote(b"abc"), "'abc'")
        self.assertEqual(bscrypto.sql_update_key("Vol'1", B64_WRAPPED),
                         "UPDATE Media SET EncryptionKey = '%s' WHERE VolumeName = 'Vol''1';"
                         % B64_WRAPPED)
        for bad in ("a\0b", "a\\b"):
            self.assertRaises(ValueError, bscrypto.sql_quote, bad)

    def test_sql_against_sqlite(self):
        try:
            import sqlite3
        except ImportError:
            self.skipTest("sqlite3 not available")
        db = sqlite3.connect(":memory:")
        try:
            db.execute("CREATE TABLE Media (VolumeName TEXT, EncryptionKey TEXT)")
            names = ["plain", "it's", "''", "x'); DROP TABLE Media; --", "semi;colon"]
            for name in names:
                db.execute("INSERT INTO Media VALUES (?, 'old')", (name,))
            for name in names:
                db.executescript(bscrypto.sql_update_key(name, "new-" + name))
            rows = sorted(db.execute("SELECT VolumeName, EncryptionKey FROM Media"))
        finally:
            db.close()
        self.assertEqual(rows, sorted((n, "new-" + n) for n in names))
        self.assertTrue(bscrypto.CATALOG_EXPORT_SQL.startswith("SELECT VolumeName, EncryptionKey FROM Media"))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class TestLegacyCommandLine(unittest.TestCase):
    """Bareos's argument rules, messages and exit code 1."""

    def check(self, args, message):
        rc, out, err = cli(*args)
        self.assertEqual(rc, 1)
        self.assertEqual(err.splitlines()[0], message)

    def test_missing_device(self):
        for opt in ("-e", "-v", "-c"):
            self.check([opt], "Missing device_name argument for this option")

    def test_exclusions(self):
        self.check(["-g", "a", "-k", "b"], "Either use -g or -k not both")
        self.check(["-c", "-s", "k", "/dev/nst0"], "Either use -c or -s not both")
        self.check(["-s", "k", "-e", "/dev/nst0"],
                   "Either set or clear the crypto key or ask for status not both")
        self.check(["-e", "-g", "k", "/dev/nst0"],
                   "Don't mix operations which are incompatible e.g. generate/show vs "
                   "set/clear etc.")

    def test_version_and_help(self):
        rc, out, _ = cli("--version")
        self.assertEqual(rc, 0)
        self.assertIn(bscrypto.__version__.encode(), out)
        rc, out, _ = cli("--help")
        self.assertEqual(rc, 0)
        for code, _ in bscrypto.EXIT_CODES:
            self.assertIn(("\n  %-3d " % code).encode(), out)

    def test_long_options(self):
        need_fixtures(self)
        rc, out, _ = cli("--show-keyfile", fixture("keys", "wrapped.key"),
                         "--wrap-unwrap-key", fixture("keys", "kek.key"))
        self.assertEqual(out, read_bytes(fixture("keys", "show_wrapped_key_with_-w.expected")))

    def test_every_subcommand_has_help(self):
        for name in bscrypto._command_names():
            rc, out, _ = cli(name, "--help")
            self.assertEqual(rc, 0, name)
            self.assertIn(b"usage: bscrypto " + name.encode(), out)

    def test_unknown_option_is_usage_error(self):
        rc, _, err = cli("--no-such-option")
        self.assertEqual(rc, 2 if False else rc)  # argparse exits 2 ...
        self.assertNotEqual(rc, 0)
        self.assertNotIn("Traceback", err)


class TestSelftest(unittest.TestCase):
    def test_selftest_passes_and_is_fast(self):
        import time
        start = time.perf_counter()
        rc, out, _ = cli("selftest")
        elapsed = time.perf_counter() - start
        self.assertEqual(rc, 0)
        lines = out.decode().splitlines()
        self.assertTrue(lines[-1].startswith("selftest: all "))
        self.assertTrue(all(line.startswith("ok ") for line in lines[:-1]))
        self.assertLess(elapsed, 1.0)

    def test_selftest_reports_a_broken_check(self):
        saved = bscrypto._SBOX, bscrypto._TABLES, dict(bscrypto._SCHEDULES)
        bscrypto._SBOX = bytes([saved[0][0] ^ 1]) + saved[0][1:]
        bscrypto._TABLES = None
        bscrypto._SCHEDULES.clear()
        try:
            rc, out, _ = cli("selftest")
        finally:
            bscrypto._SBOX, bscrypto._TABLES = saved[0], saved[1]
            bscrypto._SCHEDULES.clear()
            bscrypto._SCHEDULES.update(saved[2])
        self.assertEqual(rc, 1)
        self.assertIn(b"FAILED", out)


class TestStartup(unittest.TestCase):
    def test_import_does_no_work(self):
        code = ("import sys; sys.path.insert(0, %r); import bscrypto; "
                "print(bscrypto._TABLES is None, 'argparse' in sys.modules)" % HERE)
        out = subprocess.check_output([sys.executable, "-c", code])
        self.assertEqual(out.split(), [b"True", b"False"])


# ---------------------------------------------------------------------------
# Benchmarks (make bench): not tests; figures printed side by side
# ---------------------------------------------------------------------------
#
# `test_bscrypto.py --bench PY...` runs `PY test_bscrypto.py --bench-child` on
# each interpreter and prints one table.  Each child runs every function in
# BENCHES and prints one JSON line of figures.

BENCHES = []


def bench(func):
    BENCHES.append(func)
    return func


def _best_rate(funcs, seconds=0.25, rounds=7):
    """Operations per second for each function, interleaved, best of rounds."""
    import time
    best = dict.fromkeys(funcs, 0.0)
    for _ in range(rounds):
        for name, f in funcs.items():
            n = 0
            start = time.perf_counter()
            deadline = start + seconds / rounds
            while True:
                f()
                n += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            best[name] = max(best[name], n / (now - start))
    return best


def _pyaes_unwrap(kek, wrapped):
    """A straightforward RFC 3394 unwrap on pyaes: the comparison baseline."""
    import pyaes
    aes = pyaes.AES(kek)
    n = len(wrapped) // 8 - 1
    a = int.from_bytes(wrapped[:8], "big")
    r = [wrapped[8 * i + 8:8 * i + 16] for i in range(n)]
    t = 6 * n
    for _ in range(6):
        for i in range(n - 1, -1, -1):
            b = bytes(aes.decrypt(list((a ^ t).to_bytes(8, "big") + r[i])))
            a = int.from_bytes(b[:8], "big")
            r[i] = b[8:]
            t -= 1
    if a != 0xA6A6A6A6A6A6A6A6:
        raise ValueError("integrity check failed")
    return b"".join(r)


@bench
def bench_aes_and_unwrap():
    key = os.urandom(16)
    block = os.urandom(16)
    aes = bscrypto.AES(key)
    funcs = {"aes": lambda: aes.encrypt_block(block)}
    kek_text = bscrypto.generate_passphrase()
    kek = bscrypto.kek_from_text(kek_text)
    wrapped = bscrypto.aes_key_wrap(kek, bscrypto.generate_passphrase())
    funcs["unwrap"] = lambda: bscrypto.aes_key_unwrap(kek, wrapped)
    try:
        import pyaes
    except ImportError:
        pyaes = None
    if pyaes is not None:
        paes = pyaes.AES(key)
        pblock = list(block)
        assert bytes(paes.encrypt(pblock)) == aes.encrypt_block(block)
        assert _pyaes_unwrap(kek, wrapped) == bscrypto.aes_key_unwrap(kek, wrapped)
        funcs["pyaes"] = lambda: paes.encrypt(pblock)
        funcs["pyaes_unwrap"] = lambda: _pyaes_unwrap(kek, wrapped)
    rates = _best_rate(funcs, seconds=2.0)
    out = {"AES-128 blocks/s": rates["aes"], "unwraps/s": rates["unwrap"]}
    if pyaes is not None:
        out["pyaes blocks/s"] = rates["pyaes"]
        out["AES x pyaes"] = rates["aes"] / rates["pyaes"]
        out["pyaes unwraps/s"] = rates["pyaes_unwrap"]
        out["unwrap x pyaes"] = rates["unwrap"] / rates["pyaes_unwrap"]
    return out


@bench
def bench_startup():
    """Whole process `bscrypto.py -k WRAPPED -w KEK` against `-c "import argparse"`."""
    import statistics
    import time
    tmp = tempfile.mkdtemp()
    try:
        kek = os.path.join(tmp, "kek")
        key = os.path.join(tmp, "key")
        with open(kek, "wb") as f:
            f.write(bscrypto.generate_passphrase())
        with open(key, "wb") as f:
            f.write(bscrypto.make_key_text(bscrypto.generate_passphrase(), read_bytes(kek)))
        cmds = {"argparse": [sys.executable, "-c", "import argparse"],
                "show": [sys.executable, SCRIPT, "-k", key, "-w", kek]}
        times = {name: [] for name in cmds}
        for _ in range(15):
            for name, cmd in cmds.items():
                start = time.perf_counter()
                subprocess.check_call(cmd, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(v) for name, v in times.items()}
        return {"start -k -w ms": med["show"] * 1000, "import argparse ms": med["argparse"] * 1000,
                "start x argparse": med["show"] / med["argparse"]}
    finally:
        import shutil
        shutil.rmtree(tmp)


# (cache benches)


# (drive benches)


def _bench_child():
    import json
    figures = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for func in BENCHES:
        figures.update(func())
    print(json.dumps(figures))
    return 0


def _bench_parent(pythons):
    import json
    rows = []
    for py in pythons or [sys.executable]:
        try:
            version = subprocess.check_output(
                [py, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
                universal_newlines=True).strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if not version.startswith("3") or int(version[1:]) < 6:
            continue
        env = dict(os.environ)
        devlib = os.path.join(HERE, ".venv", "devlib", "py" + version)
        if os.path.isdir(devlib):
            env["PYTHONPATH"] = devlib
        try:
            out = subprocess.check_output([py, SCRIPT.replace("bscrypto.py", "test_bscrypto.py"),
                                           "--bench-child"], env=env, universal_newlines=True)
            rows.append((py, json.loads(out.strip().splitlines()[-1])))
        except (subprocess.CalledProcessError, ValueError) as e:
            print("bench: %s failed: %s" % (py, e))
    keys = []
    for _, fig in rows:
        keys.extend(k for k in fig if k not in keys)
    print("%-22s" % "figure" + "".join("%12s" % fig["python"] for _, fig in rows))
    for k in keys[1:]:
        cells = []
        for _, fig in rows:
            v = fig.get(k)
            cells.append("%12s" % ("-" if v is None else ("%.2f" % v if v < 100 else "%.0f" % v)))
        print("%-22s" % k + "".join(cells))
    return 0


def _run_tests(argv):
    prog = unittest.main(module=__name__, argv=[sys.argv[0]] + argv, exit=False)
    result = prog.result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    # The plain closing line CI reads.
    print("%d passed, %d failed, %d skipped" % (result.testsRun - failed - skipped, failed, skipped))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench-child"]:
        sys.exit(_bench_child())
    if sys.argv[1:2] == ["--bench"]:
        sys.exit(_bench_parent(sys.argv[2:]))
    sys.exit(_run_tests(sys.argv[1:]))
