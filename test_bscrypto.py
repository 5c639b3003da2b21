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

# Fixture cache: written by Bareos's C bscrypto -p from entries.tsv at this time.
CACHE_FIXTURE_TIME = 1795628524
DAY = 24 * 3600
FUZZ_FULL = os.environ.get("BSCRYPTO_FUZZ") == "full"


def make_cache(entries, pointer_size=8, big_endian=False, pointer_fill=b"", count=None,
               version=1, trailing=b""):
    """A cache file built from FORMATS.md section 5 offsets, independently of bscrypto.

    32-bit entries: 8 pointer bytes, names at 8 and 136, int64 at 264, 272 bytes.
    """
    import struct
    order = ">" if big_endian else "<"
    size = 280 if pointer_size == 8 else 272
    out = bytearray(b"BAREOS Crypto Cache\n\0\0\0\0")
    out += struct.pack(order + "ii", version, len(entries) if count is None else count)
    for name, key, added in entries:
        e = bytearray(size)
        e[0:2 * pointer_size] = (pointer_fill * 16)[:2 * pointer_size].ljust(2 * pointer_size,
                                                                            b"\0")
        base = 2 * pointer_size
        e[base:base + len(name)] = name
        e[base + 128:base + 128 + len(key)] = key
        e[base + 256:base + 264] = struct.pack(order + "q", added)
        out += e
    return bytes(out + trailing)


def fixture_entries():
    with open(fixture("cache", "entries.tsv"), "rb") as f:
        return [tuple(line.rstrip(b"\n").split(b"\t")) for line in f]


class CacheTestCase(TempDirTestCase):
    T = CACHE_FIXTURE_TIME

    def setUp(self):
        TempDirTestCase.setUp(self)
        self.cache = self.path("bareos-sd.9103.cryptoc")

    def put(self, data, path=None):
        """Write a cache file with an old mtime, so any rewrite shows."""
        path = path or self.cache
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o640)
        os.utime(path, ns=(1000000000 * 10 ** 9, 1000000000 * 10 ** 9))
        return path

    def snapshot(self, path=None):
        path = path or self.cache
        st = os.stat(path)
        return read_bytes(path), st.st_mtime_ns, st.st_ino, stat.S_IMODE(st.st_mode)

    def entries(self, path=None):
        return [tuple(e) for e in bscrypto.read_cache(path or self.cache).entries]

    def populate(self, text, *args, **kw):
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        return cli("-p", self.cache, *args, stdin=text, **kw)

    def no_temp_files(self):
        return [n for n in os.listdir(self.tmp) if n.endswith(".tmp")]


class TestCacheFixtures(CacheTestCase):
    """The cache written and dumped by Bareos's C bscrypto, byte for byte."""

    def setUp(self):
        CacheTestCase.setUp(self)
        need_fixtures(self)

    def test_reads_bareos_fixture(self):
        cache = bscrypto.read_cache(fixture("cache", "basic.cryptoc"))
        self.assertEqual(cache.layout.name, "lp64-le")
        self.assertEqual([(e.volume_name.encode(), e.encryption_key.encode())
                          for e in cache.entries], fixture_entries())
        self.assertEqual({e.added for e in cache.entries}, {self.T})

    def test_dump_equals_bareos_output_in_utc(self):
        expected = read_bytes(fixture("cache", "basic.dump.expected"))
        env = dict(os.environ, TZ="UTC")
        for args in (["-D"], ["dump-cache"], ["--dump-cache"]):
            out = subprocess.check_output([sys.executable, SCRIPT] + args
                                          + [fixture("cache", "basic.cryptoc")], env=env)
            self.assertEqual(out, expected, args)

    def test_dump_uses_local_time(self):
        import time
        saved = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kolkata"       # +05:30, no DST
        time.tzset()
        try:
            rc, out, err = cli("-D", fixture("cache", "basic.cryptoc"))
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
            time.tzset()
        self.assertEqual(rc, 0, err)
        if b"23:12:04" not in out:
            self.skipTest("no zoneinfo for Asia/Kolkata on this host")
        self.assertIn(b"2026-11-25 23:12:04  2027-01-24 23:12:04 \n", out)

    def test_populate_reproduces_bareos_file(self):
        # Same bytes as Bareos's file except its pointer garbage (zeros here).
        rc, out, err = self.populate(read_bytes(fixture("cache", "entries.tsv")),
                                     "--now", str(self.T), "--layout", "lp64-le")
        self.assertEqual((rc, out, err), (0, b"", ""))
        expected = bytearray(read_bytes(fixture("cache", "basic.cryptoc")))
        for i in range(4):
            expected[32 + 280 * i:48 + 280 * i] = bytes(16)
        self.assertEqual(read_bytes(self.cache), bytes(expected))
        self.assertEqual(stat.S_IMODE(os.stat(self.cache).st_mode), 0o640)

    def test_dump_json(self):
        import json
        rc, out, _ = cli("dump-cache", fixture("cache", "basic.cryptoc"), "--json",
                         "--now", str(self.T + 60 * DAY + 1))
        doc = json.loads(out.decode("ascii"))
        self.assertEqual(doc["layout"], "lp64-le")
        self.assertEqual(doc["count"], 4)
        first = doc["entries"][0]
        self.assertEqual(first["volume_name"], "Vol0001")
        self.assertEqual(first["added"], self.T)
        self.assertEqual(first["expires"], self.T + 60 * DAY)
        self.assertEqual(first["added_utc"], "2026-11-25T17:42:04Z")
        self.assertTrue(first["expired"])
        self.assertEqual(json.loads(cli("-D", fixture("cache", "basic.cryptoc"), "--json",
                                        "--now", str(self.T))[1].decode())["entries"][0]
                         ["expired"], False)

    def test_lookup(self):
        rc, out, _ = cli("lookup", "Vol0002", fixture("cache", "basic.cryptoc"))
        self.assertEqual((rc, out), (0, fixture_entries()[1][1] + b"\n"))
        rc, out, err = cli("lookup", "Vol9999", fixture("cache", "basic.cryptoc"))
        self.assertEqual((rc, out), (bscrypto.EXIT_NOT_FOUND, b""))
        self.assertIn("Vol9999 is not in crypto cache", err)

    def test_export_is_the_populate_input(self):
        self.assertEqual(cli("export", fixture("cache", "basic.cryptoc"))[1],
                         read_bytes(fixture("cache", "entries.tsv")))


class TestCacheFormat(CacheTestCase):
    """Reading and writing every layout; dump, JSON, lookup and export rules."""

    def test_every_layout_reads_and_writes(self):
        entries = [(b"Vol0001", b"key-one", self.T), (b"Full-0002", b"k" * 127, self.T - 5),
                   (b"n" * 127, b"+/=", -1)]
        want = [(n.decode(), k.decode(), t) for n, k, t in entries]
        for name, psize, big in (("lp64-le", 8, False), ("ilp32-le", 4, False),
                                 ("lp64-be", 8, True), ("ilp32-be", 4, True)):
            data = make_cache(entries, psize, big, pointer_fill=b"\x90\x55\xae")
            self.put(data)
            cache = bscrypto.read_cache(self.cache)
            self.assertEqual(cache.layout.name, name)
            self.assertEqual([tuple(e) for e in cache.entries], want, name)
            rc, _, err = cli("-d", "1", "-D", self.cache)
            self.assertEqual(rc, 0)
            self.assertIn("layout %s" % name, err)
            # Writing in the same layout gives the independent builder's bytes.
            self.assertEqual(cli("-r", self.cache, "--now", "77", "--layout", name)[0], 0)
            self.assertEqual(read_bytes(self.cache),
                             make_cache([(n, k, 77) for n, k, _ in entries], psize, big))

    def test_entry_sizes_match_the_c_compiler(self):
        """The layouts' struct sizes, checked by gcc (-m32 for 32-bit) when present."""
        src = self.path("s.c")
        with open(src, "w") as f:
            f.write("struct dlink { void *next; void *prev; };\n"
                    "struct e { struct dlink link; char VolumeName[128];"
                    " char EncryptionKey[128]; long long added; };\n"
                    "struct h { char id[21]; int version; int nr_entries; };\n"
                    "_Static_assert(sizeof(struct h) == 32, \"header\");\n"
                    "_Static_assert(sizeof(struct e) == SIZE, \"entry\");\n"
                    "_Static_assert(__builtin_offsetof(struct e, added) == SIZE - 8, \"t\");\n")
        checked = 0
        for flag, psize in (("-m64", 8), ("-m32", 4)):
            layout = next(x for x in bscrypto.CACHE_LAYOUTS if x.pointer_size == psize)
            try:
                ok = subprocess.call(["gcc", flag, "-fsyntax-only", "-DSIZE=%d"
                                      % layout.entry_size, src], stderr=subprocess.DEVNULL)
                bad = subprocess.call(["gcc", flag, "-fsyntax-only", "-DSIZE=%d"
                                       % (layout.entry_size - 4), src],
                                      stderr=subprocess.DEVNULL)
            except OSError:
                self.skipTest("gcc not installed")
            if ok == 0:
                self.assertNotEqual(bad, 0)
                checked += 1
        if not checked:
            self.skipTest("gcc cannot compile for -m64 or -m32 here")

    def test_default_write_is_host_layout(self):
        self.put(make_cache([(b"V1", b"k1", self.T)], 4, True))
        self.assertEqual(self.populate("V2\tk2\n", "--now", str(self.T))[0], 0)
        cache = bscrypto.read_cache(self.cache)
        self.assertEqual(cache.layout, bscrypto.host_cache_layout())
        self.assertEqual([e.volume_name for e in cache.entries], ["V1", "V2"])

    def test_layout_choice_converts_even_without_changes(self):
        self.put(make_cache([(b"V1", b"k1", self.T)]))
        self.assertEqual(cli("populate-cache", self.cache, "--layout", "ilp32-be",
                             stdin=b"V1\tk1\n", )[0], 0)
        self.assertEqual(read_bytes(self.cache)[:32], make_cache([(b"V1", b"k1", 0)], 4,
                                                                 True)[:32])
        self.assertEqual(bscrypto.read_cache(self.cache).layout.name, "ilp32-be")

    def test_32bit_with_trailing_bytes_is_not_taken_for_64bit(self):
        # 2 entries of 272 bytes + 16 trailing bytes = exactly 2 x 280.
        self.put(make_cache([(b"Vol0001", b"a" * 43, self.T), (b"Vol0002", b"b" * 54, self.T)],
                            4, trailing=b"\x01" * 16))
        saved = sys.stderr
        sys.stderr = io.StringIO()
        try:
            cache = bscrypto.read_cache(self.cache)
        finally:
            warning, sys.stderr = sys.stderr.getvalue(), saved
        self.assertEqual(cache.layout.name, "ilp32-le")
        self.assertEqual([e.volume_name for e in cache.entries], ["Vol0001", "Vol0002"])
        self.assertIn("16 bytes after the 2 entries", warning)

    def test_any_bytes_round_trip(self):
        # Not UTF-8, spaces, punctuation: stored and dumped as the raw bytes.
        name, key = b"Vol\xff\xfe\x80", b"k\xe9y with spaces\x01"
        rc, _, err = self.populate(name + b"\t" + key + b"\n", "--now", str(self.T))
        self.assertEqual(rc, 0, err)
        e = bscrypto.read_cache(self.cache).entries[0]
        self.assertEqual(e.volume_name.encode("utf-8", "surrogateescape"), name)
        data = read_bytes(self.cache)
        self.assertIn(name + b"\0", data)
        self.assertIn(key + b"\0", data)
        out = cli("-D", self.cache)[1]
        self.assertIn(b"\n" + name + b"     " + key + b" ", out)
        self.assertEqual(cli("export", self.cache)[1], name + b"\t" + key + b"\n")
        self.assertEqual(cli("lookup", e.volume_name, self.cache)[1], key + b"\n")
        import json
        doc = json.loads(cli("dump-cache", self.cache, "--json")[1].decode("ascii"))
        self.assertEqual(doc["entries"][0]["volume_name"].encode("utf-8", "surrogateescape"),
                         name)

    def test_empty_cache_dump_is_the_header_line(self):
        self.put(make_cache([]))
        self.assertEqual(cli("-D", self.cache)[1],
                         b"Volumename EncryptionKey Added                Expires             \n")

    def test_dump_widths_follow_longest_value(self):
        self.put(make_cache([(b"V", b"k", 0), (b"LongVolumeName-1", b"short", 0)]))
        import time
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))
        lines = cli("-D", self.cache)[1].split(b"\n")
        self.assertEqual(lines[0], b"Volumename       EncryptionKey Added                "
                                   b"Expires             ")
        self.assertTrue(lines[1].startswith(b"V                k             " + stamp.encode()))

    def test_export_round_trip(self):
        rng = random.Random(31)
        printable = bytes(range(0x21, 0x7f)) + b" \x80\xff\r"
        rows = []
        for i in range(200):
            name = bytes(rng.choice(printable) for _ in range(rng.randint(0, 60)))
            key = bytes(rng.choice(printable) for _ in range(rng.randint(0, 126)))
            rows.append((b"%d-" % i + name.replace(b"\r", b"")[:120],
                         b"k" + key.rstrip(b" \r")))
        self.put(make_cache([(n, k, i) for i, (n, k) in enumerate(rows)]))
        rc, tsv, err = cli("export", self.cache)
        self.assertEqual(rc, 0, err)
        copy = self.path("copy.cryptoc")
        self.assertEqual(cli("-p", copy, stdin=tsv)[0], 0)
        self.assertEqual([(e[0], e[1]) for e in self.entries(copy)],
                         [(e[0], e[1]) for e in self.entries()])

    def test_export_refuses_what_tsv_cannot_carry(self):
        for name, key in ((b"a\tb", b"k"), (b"", b"k"), (b"v", b"k "), (b"v", b"k\nx")):
            self.put(make_cache([(b"ok", b"k", 1), (name, key, 1)]))
            rc, out, err = cli("export", self.cache)
            self.assertEqual(rc, bscrypto.EXIT_CACHE, (name, key))
            self.assertIn("entry 2", err)
            self.assertEqual(out, b"")

    def test_api_write_cache_and_lock(self):
        entries = [bscrypto.CacheEntry("V1", "k1", 5), bscrypto.CacheEntry("V2", "k2", 6)]
        with bscrypto.cache_lock(self.cache):
            bscrypto.write_cache(self.cache, entries, layout="ilp32-le")
        cache = bscrypto.read_cache(self.cache)
        self.assertEqual((cache.entries, cache.layout.name), (entries, "ilp32-le"))
        self.assertTrue(os.path.exists(self.cache + ".lock"))
        for bad in (bscrypto.CacheEntry("x" * 128, "k", 1), bscrypto.CacheEntry("v", "k\0", 1),
                    bscrypto.CacheEntry("v", "k", 1 << 63)):
            with self.assertRaises(bscrypto.CacheError):
                bscrypto.write_cache(self.cache, entries + [bad])
        self.assertEqual(bscrypto.read_cache(self.cache).entries, entries)

    def test_writes_through_a_symlink(self):
        self.put(make_cache([(b"V1", b"k1", 1)]), self.path("real.cryptoc"))
        os.symlink("real.cryptoc", self.cache)
        self.assertEqual(self.populate("V2\tk2\n", "--now", "2")[0], 0)
        self.assertTrue(os.path.islink(self.cache))
        self.assertEqual(len(self.entries(self.path("real.cryptoc"))), 2)


class TestCacheRules(CacheTestCase):
    """Bareos's update rules, with "now" fixed by --now or SOURCE_DATE_EPOCH."""

    def test_replace_in_place_and_refresh(self):
        self.put(make_cache([(b"A", b"ka", self.T), (b"B", b"kb", self.T), (b"C", b"kc", self.T)]))
        rc, _, err = self.populate("B\tnew\n", "--now", str(self.T + 10))
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.entries(), [("A", "ka", self.T), ("B", "new", self.T + 10),
                                          ("C", "kc", self.T)])

    def test_append_new_names_in_input_order(self):
        self.put(make_cache([(b"A", b"ka", self.T)]))
        self.populate("Z\tkz\nM\tkm\nZ\tkz2\n", "--now", str(self.T))
        self.assertEqual(self.entries(), [("A", "ka", self.T), ("Z", "kz2", self.T),
                                          ("M", "km", self.T)])

    def test_expiry_boundary(self):
        # Bareos drops an entry when added + 60 days < now: 60 days exactly is kept.
        old = make_cache([(b"Old", b"ko", self.T), (b"A", b"ka", self.T + 100)])
        for delta, kept in ((60 * DAY, True), (60 * DAY + 1, False)):
            self.put(old)
            rc, _, err = self.populate("New\tkn\n", "--now", str(self.T + delta))
            self.assertEqual(rc, 0, err)
            self.assertEqual("Old" in [e[0] for e in self.entries()], kept, delta)
            self.assertEqual(len(self.entries()), 3 if kept else 2)

    def test_expired_entry_being_updated_is_kept_and_refreshed(self):
        self.put(make_cache([(b"A", b"ka", 0), (b"B", b"kb", 0)]))
        now = 100 * DAY
        self.populate("A\tka\n", "--now", str(now))
        self.assertEqual(self.entries(), [("A", "ka", now)])

    def test_later_update_of_an_expired_name_appends_it(self):
        # Bareos removes every other expired entry on the first update, so a
        # name updated later in the same input comes back at the end.
        self.put(make_cache([(b"A", b"ka", 0), (b"B", b"kb", 0), (b"C", b"kc", 90 * DAY)]))
        self.populate("C\tkc\nA\tka\n", "--now", str(100 * DAY))
        self.assertEqual([e[0] for e in self.entries()], ["C", "A"])

    def test_unchanged_input_leaves_the_file_untouched(self):
        self.put(make_cache([(b"A", b"ka", self.T), (b"B", b"kb", self.T)]))
        before = self.snapshot()
        rc, out, err = cli("populate-cache", self.cache, "--now", str(self.T + DAY),
                           "--backup", stdin=b"A\tka\nB\tkb\n")
        self.assertEqual(rc, 0, err)
        self.assertIn(b"0 added, 0 updated, 2 unchanged, 0 expired removed; nothing changed",
                      out)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(sorted(os.listdir(self.tmp)),        # no backup, no temp file
                         ["bareos-sd.9103.cryptoc", "bareos-sd.9103.cryptoc.lock"])

    def test_change_refreshes_matched_entries_too(self):
        # When something changes Bareos writes its list, where every matched
        # entry already carries the new time.
        self.put(make_cache([(b"A", b"ka", self.T), (b"B", b"kb", self.T)]))
        self.populate("A\tka\nC\tkc\n", "--now", str(self.T + DAY))
        self.assertEqual(self.entries(), [("A", "ka", self.T + DAY), ("B", "kb", self.T),
                                          ("C", "kc", self.T + DAY)])

    def test_expiry_happens_only_on_update(self):
        self.put(make_cache([(b"A", b"ka", 0)]))
        before = self.snapshot()
        now = str(100 * DAY)
        self.assertEqual(cli("-D", self.cache, "--now", now)[0], 0)
        self.assertEqual(self.populate(b"", "--now", now)[0], 0)     # no input, no update
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(cli("-r", self.cache, "--now", now)[0], 0)   # reset keeps it
        self.assertEqual(self.entries(), [("A", "ka", 100 * DAY)])

    def test_stats_api(self):
        entries = [bscrypto.CacheEntry("A", "ka", 0), bscrypto.CacheEntry("B", "kb", 10 ** 7)]
        copy = list(entries)
        new, stats = bscrypto.apply_cache_updates(
            entries, [("B", "kb"), ("C", "kc"), ("B", "kb2")], 10 ** 7)
        self.assertEqual(entries, copy)
        self.assertEqual(stats, {"added": 1, "updated": 1, "unchanged": 1, "expired_removed": 1})
        self.assertEqual([tuple(e) for e in new], [("B", "kb2", 10 ** 7), ("C", "kc", 10 ** 7)])
        self.assertEqual(bscrypto.apply_cache_updates(entries, [], 10 ** 9),
                         (entries, {"added": 0, "updated": 0, "unchanged": 0,
                                    "expired_removed": 0}))
        self.assertEqual(bscrypto.CACHE_EXPIRY_SECONDS, 5184000)
        for bad, text in ((("v" * 128, "k"), "volume 'vvv"), (("v", "secret" * 30), "an entry"),
                          (("v", "a\0b"), "NUL"), ((5, "k"), "not text"),
                          ((b"v", b"\xff"), None)):
            if text is None:    # bytes are fine, stored as they are
                self.assertEqual(bscrypto.apply_cache_updates([], [bad], 1)[0][0].volume_name,
                                 "v")
                continue
            with self.assertRaises(bscrypto.CacheError) as cm:
                bscrypto.apply_cache_updates([], [bad], 1)
            self.assertIn(text, str(cm.exception))
            self.assertNotIn("secret", str(cm.exception))

    def test_linear_time_update(self):
        # Bareos searches its list for every update: 20,000 x 20,000 here.
        import time
        entries = [bscrypto.CacheEntry("Vol%06d" % i, "k", 1000) for i in range(20000)]
        updates = [("Vol%06d" % i, "k2") for i in range(20000)]
        start = time.perf_counter()
        _, stats = bscrypto.apply_cache_updates(entries, updates, 2000)
        self.assertLess(time.perf_counter() - start, 2.0)
        self.assertEqual(stats["updated"], 20000)

    def test_reset(self):
        self.put(make_cache([(b"A", b"ka", 1), (b"B", b"kb", 2)]))
        self.assertEqual(cli("-r", self.cache, "--now", "500")[0], 0)
        self.assertEqual(self.entries(), [("A", "ka", 500), ("B", "kb", 500)])
        before = self.snapshot()
        self.assertEqual(cli("reset-cache", self.cache, "--now", "500")[0], 0)
        self.assertEqual(self.snapshot(), before)       # nothing to change

    def test_source_date_epoch_and_now(self):
        saved = os.environ.get("SOURCE_DATE_EPOCH")
        try:
            os.environ["SOURCE_DATE_EPOCH"] = "12345"
            self.assertEqual(bscrypto.resolve_now(), 12345)
            self.assertEqual(bscrypto.resolve_now(7), 7)
            self.populate("A\tka\n")
            self.assertEqual(self.entries(), [("A", "ka", 12345)])
            self.populate("A\tkb\n", "--now", "99")
            self.assertEqual(self.entries(), [("A", "kb", 99)])
            os.environ["SOURCE_DATE_EPOCH"] = "yesterday"
            rc, _, err = self.populate("A\tkc\n")
            self.assertEqual(rc, bscrypto.EXIT_USAGE)
            self.assertIn("SOURCE_DATE_EPOCH", err)
            del os.environ["SOURCE_DATE_EPOCH"]
            import time
            self.assertLessEqual(abs(bscrypto.resolve_now() - time.time()), 2)
        finally:
            if saved is None:
                os.environ.pop("SOURCE_DATE_EPOCH", None)
            else:
                os.environ["SOURCE_DATE_EPOCH"] = saved

    def test_prompt_only_on_a_terminal(self):
        rc, out, _ = self.populate("A\tka\n", tty=True)
        self.assertEqual((rc, out), (0, b"Enter cache entrie(s) (close with ^D): "))
        _, out, _ = self.populate("B\tkb\n")
        self.assertEqual(out, b"")
        # On a terminal an empty line ends input, as in Bareos.
        self.populate("C\tkc\n\nD\tkd\n", tty=True)
        self.assertEqual([e[0] for e in self.entries()], ["A", "B", "C"])

    def test_bareos_line_rules(self):
        # CR LF, trailing spaces stripped (Bareos StripTrailingJunk); TABs
        # after the first belong to the key; a final empty line is fine.
        rc, _, err = self.populate(b"A\tk a \r\nB\tk\tb\n\n\n")
        self.assertEqual(rc, 0, err)
        self.assertEqual([e[:2] for e in self.entries()], [("A", "k a"), ("B", "k\tb")])

    def test_bad_lines_write_nothing(self):
        self.put(make_cache([(b"A", b"ka", self.T)]))
        before = self.snapshot()
        cases = [(b"B\tkb\nno tab here\n", "line 2: no TAB"),
                 (b"\tkb\n", "line 1: empty volume name"),
                 (b"B\t\n", "line 1: empty encryption key"),
                 (b"B\tkb\n" + b"N" * 128 + b"\tk\n", "line 2: volume name is 128 bytes"),
                 (b"B\t" + b"K" * 128 + b"\n", "line 1: encryption key is 128 bytes"),
                 (b"B\0x\tk\n", "line 1: volume name contains a NUL"),
                 (b"B\tkb\n\nC\tkc\n", "line 2: empty line before more entries")]
        for text, message in cases:
            for face in (["-p", self.cache], ["populate-cache", self.cache]):
                rc, _, err = cli(*face, stdin=text)
                self.assertEqual(rc, bscrypto.EXIT_USAGE, text)
                self.assertIn(message, err)
                self.assertIn("nothing written", err)
                self.assertNotIn("Traceback", err)
                self.assertEqual(self.snapshot(), before, text)

    def test_127_bytes_fit(self):
        rc, _, err = self.populate(b"N" * 127 + b"\t" + b"K" * 127 + b"\n")
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.entries()[0][:2], ("N" * 127, "K" * 127))

    def test_skip_bad_lines(self):
        rc, _, err = self.populate(b"A\tka\nbroken\nB\tkb\n\tx\n", "--skip-bad-lines")
        self.assertEqual(rc, 0)
        self.assertIn("warning: line 2 skipped: no TAB", err)
        self.assertIn("warning: line 4 skipped: empty volume name", err)
        self.assertEqual([e[0] for e in self.entries()], ["A", "B"])

    def test_missing_cache_and_empty_input_creates_nothing(self):
        self.assertEqual(self.populate(b"")[0], 0)
        self.assertEqual(self.populate(b"", "--layout", "ilp32-be")[0], 0)
        self.assertFalse(os.path.exists(self.cache))
        # Started with stdin closed (cron, `<&-`): no input, not a traceback.
        child = subprocess.Popen(["/bin/sh", "-c", 'exec "$0" "$1" -p "$2" <&-', sys.executable,
                                  SCRIPT, self.cache], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        out, err = child.communicate()
        self.assertEqual((child.returncode, out, err), (0, b"", b""))
        self.assertFalse(os.path.exists(self.cache))

    def test_new_file_mode_and_kept_mode_and_owner(self):
        old = os.umask(0o077)
        try:
            self.populate("A\tka\n")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.cache).st_mode), 0o640)
        os.chmod(self.cache, 0o600)
        if os.geteuid() == 0:
            os.chown(self.cache, 12345, 23456)
        self.populate("B\tkb\n")
        st = os.stat(self.cache)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        if os.geteuid() == 0:
            self.assertEqual((st.st_uid, st.st_gid), (12345, 23456))
            self.assertEqual(os.stat(self.cache + ".lock").st_uid, 12345)

    def test_backup(self):
        self.put(make_cache([(b"A", b"ka", self.T)]))
        os.chmod(self.cache, 0o600)
        original = read_bytes(self.cache)
        for args in (["-p", self.cache, "--backup"], ["reset-cache", self.cache, "--backup"],
                     ["populate-cache", self.cache, "--backup"]):
            self.assertEqual(cli(*(args + ["--now", str(self.T + 1)]),
                                 stdin=b"B-%s\tkb\n" % args[0].encode())[0], 0)
        backups = sorted(n for n in os.listdir(self.tmp) if n.endswith(".bak"))
        self.assertEqual(len(backups), 3)
        self.assertRegex(backups[0], r"^bareos-sd\.9103\.cryptoc\.\d{8}T\d{6}Z(\.\d+)?\.bak$")
        self.assertIn(original, [read_bytes(self.path(b)) for b in backups])
        for b in backups:
            self.assertEqual(stat.S_IMODE(os.stat(self.path(b)).st_mode), 0o600)
            bscrypto.read_cache(self.path(b))

    def test_no_backup_of_a_new_cache(self):
        self.assertEqual(self.populate("A\tka\n", "--backup")[0], 0)
        self.assertEqual(sorted(os.listdir(self.tmp)),
                         ["bareos-sd.9103.cryptoc", "bareos-sd.9103.cryptoc.lock"])


class TestCacheNeverLost(CacheTestCase):
    """Whatever cannot be read is reported in one line and left exactly as it was."""

    def bad_files(self):
        good = make_cache([(b"Vol0001", b"ka", self.T), (b"Vol0002", b"kb", self.T)])
        return [
            ("empty", b"", "shorter than the 32-byte header"),
            ("short header", good[:31], "shorter than the 32-byte header"),
            ("wrong id", b"BACULA" + good[6:], "not a Bareos crypto cache"),
            ("wrong version", make_cache([(b"V", b"k", 1)], version=2), "version 2"),
            ("version 0", make_cache([], version=0), "version 0"),
            ("count too high", make_cache([(b"V", b"k", 1)], count=2), "header counts 2 entries"),
            ("truncated entry", good[:-1], "truncated or damaged"),
            ("truncated 32-bit", make_cache([(b"V", b"k", 1)] * 2, 4)[:-1], "truncated?"),
            ("negative count", make_cache([], count=-1), "negative entry count"),
            ("name without NUL", make_cache([(b"N" * 128, b"k", 1)]),
             "volume name of entry 1 is not NUL-terminated"),
            ("key without NUL", make_cache([(b"V", b"K" * 128, 1)]),
             "key of entry 1 is not NUL-terminated"),
        ]

    def test_each_unreadable_case_for_each_command(self):
        commands = [["-D", self.cache], ["dump-cache", self.cache, "--json"],
                    ["-p", self.cache], ["populate-cache", self.cache, "--backup"],
                    ["-r", self.cache], ["reset-cache", self.cache],
                    ["lookup", "Vol0001", self.cache], ["export", self.cache]]
        for what, data, reason in self.bad_files():
            self.put(data)
            before = self.snapshot()
            for args in commands:
                rc, _, err = cli(*args, stdin=b"Vol0003\tkc\n")
                self.assertEqual(rc, bscrypto.EXIT_CACHE, (what, args, err))
                self.assertEqual(err.count("\n"), 1, (what, args, err))
                self.assertIn(reason, err, (what, args))
                self.assertEqual(self.snapshot(), before, (what, args))
                self.assertFalse(self.no_temp_files())
            self.assertEqual(sorted(os.listdir(self.tmp)),
                             ["bareos-sd.9103.cryptoc", "bareos-sd.9103.cryptoc.lock"])

    def test_missing_cache(self):
        for args in (["-D", self.cache], ["-r", self.cache], ["export", self.cache],
                     ["lookup", "V", self.cache]):
            rc, _, err = cli(*args)
            self.assertEqual(rc, bscrypto.EXIT_CACHE)
            self.assertIn("does not exist", err)
            self.assertFalse(os.path.exists(self.cache))

    def test_directory_and_unreadable(self):
        os.mkdir(self.cache)
        rc, _, err = cli("-D", self.cache)
        self.assertEqual(rc, bscrypto.EXIT_CACHE)
        self.assertEqual(err.count("\n"), 1)
        os.rmdir(self.cache)
        if os.geteuid() != 0:
            self.put(make_cache([]))
            os.chmod(self.cache, 0)
            rc, _, err = cli("-D", self.cache)
            self.assertEqual(rc, bscrypto.EXIT_CACHE)
            self.assertIn("Permission denied", err)

    def test_trailing_garbage_is_read_up_to_the_count(self):
        data = make_cache([(b"V1", b"k1", self.T)], trailing=b"\xde\xad\xbe\xef" * 5)
        self.put(data)
        before = self.snapshot()
        rc, out, err = cli("-D", self.cache)
        self.assertEqual(rc, 0)
        self.assertEqual(out.count(b"\n"), 2)
        self.assertIn("warning: %s: 20 bytes after the 1 entries" % self.cache, err)
        self.assertEqual(self.snapshot(), before)
        # A write keeps the counted entries and drops the garbage.
        self.assertEqual(self.populate("V2\tk2\n", "--now", str(self.T))[0], 0)
        self.assertEqual(read_bytes(self.cache),
                         make_cache([(b"V1", b"k1", self.T), (b"V2", b"k2", self.T)]))

    def test_unwritable_directory_leaves_cache(self):
        if os.geteuid() == 0:
            self.skipTest("root writes anywhere")
        self.put(make_cache([(b"V1", b"k1", 1)]))
        before = self.snapshot()
        os.chmod(self.tmp, 0o500)
        try:
            rc, _, _ = self.populate("V2\tk2\n")
        finally:
            os.chmod(self.tmp, 0o700)
        self.assertEqual(rc, bscrypto.EXIT_CACHE)
        self.assertEqual(self.snapshot(), before)

    def test_failed_rename_leaves_cache_and_no_temp(self):
        self.put(make_cache([(b"V1", b"k1", 1)]))
        before = self.snapshot()
        saved = os.rename

        def broken(src, dst):
            raise OSError(28, "No space left on device")
        os.rename = broken
        try:
            rc, _, err = self.populate("V2\tk2\n")
        finally:
            os.rename = saved
        self.assertEqual(rc, bscrypto.EXIT_CACHE)
        self.assertIn("No space left on device; the old file is unchanged", err)
        self.assertEqual(self.snapshot(), before)
        self.assertFalse(self.no_temp_files())

    def test_stale_temp_files_are_removed(self):
        dead = self.path(".bareos-sd.9103.cryptoc.999999999.0badf00d.tmp")
        live = self.path(".bareos-sd.9103.cryptoc.%d.0badf00d.tmp" % os.getppid())
        for p in (dead, live):
            with open(p, "wb") as f:
                f.write(b"half a cache")
        self.populate("V\tk\n")
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.exists(live))


def _start_populate(path, data, now=None):
    """A child `bscrypto.py populate-cache PATH` fed `data`; finish with _finish()."""
    args = [sys.executable, SCRIPT, "populate-cache", path]
    if now is not None:
        args += ["--now", str(now)]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    child.stdin.write(data)
    child.stdin.close()
    return child


def _finish(child):
    """(exit status, stderr text) of a child from _start_populate."""
    err = child.stderr.read()
    child.stderr.close()
    return child.wait(), err.decode("utf-8", "replace")


class TestCacheConcurrency(CacheTestCase):
    def test_eight_writers_lose_nothing(self):
        children = [_start_populate(self.cache, b"".join(
            b"P%d-Vol%03d\tkey-%d-%d\n" % (p, i, p, i) for i in range(100))) for p in range(8)]
        for child in children:
            rc, err = _finish(child)
            self.assertEqual(rc, 0, err)
        names = {e[0] for e in self.entries()}
        self.assertEqual(len(names), 800)
        self.assertEqual(len(self.entries()), 800)
        self.assertFalse(self.no_temp_files())


class TestCacheCrash(CacheTestCase):
    """SIGKILL at random points while populating leaves the old or the new cache."""

    def test_killed_writer_leaves_old_or_new(self):
        import signal
        import time
        rng = random.Random(20261125)
        iterations = 200 if FUZZ_FULL else 20
        state = [bscrypto.CacheEntry("Base%05d" % i, "k%d" % i, self.T) for i in range(3000)]
        with bscrypto.cache_lock(self.cache):
            bscrypto.write_cache(self.cache, state)

        def run(updates, kill_after=None, in_write=False):
            child = _start_populate(self.cache, b"".join(
                b"%s\t%s\n" % (n.encode(), k.encode()) for n, k in updates), self.T)
            if in_write:
                # The write takes a few ms of the run: wait for its temp file.
                deadline = time.perf_counter() + 10
                while (child.poll() is None and not self.no_temp_files()
                       and time.perf_counter() < deadline):
                    pass
                if self.no_temp_files():
                    outcomes["in write"] += 1
            if kill_after is not None:
                time.sleep(kill_after)
                child.send_signal(signal.SIGKILL)
            return _finish(child)[0]

        start = time.perf_counter()
        self.assertEqual(run([("Warmup", "w")]), 0)
        span = time.perf_counter() - start
        state = bscrypto.apply_cache_updates(state, [("Warmup", "w")], self.T)[0]
        outcomes = {"old": 0, "new": 0, "in write": 0}
        for it in range(iterations):
            updates = [("It%03d-%03d" % (it, j), "key%d" % j) for j in range(50)]
            updates.append(("Base%05d" % rng.randrange(3000), "changed%d" % it))
            new = bscrypto.apply_cache_updates(state, updates, self.T)[0]
            if it % 2:
                run(updates, rng.uniform(0, 0.004), in_write=True)
            else:
                run(updates, rng.uniform(0, span * 1.3))
            got = bscrypto.read_cache(self.cache).entries     # always readable
            self.assertIn(got, (state, new), it)
            outcomes["new" if got == new else "old"] += 1
            state = got
        self.assertEqual(outcomes["old"] + outcomes["new"], iterations)
        self.assertGreater(outcomes["in write"], 0)
        if FUZZ_FULL:
            sys.stderr.write(" (kills: %(old)d left the old cache, %(new)d the new; %(in write)d "
                             "aimed inside the write) " % outcomes)
        # The next write cleans up what killed writers left behind.
        self.assertEqual(run([("Final", "f")]), 0)
        self.assertFalse(self.no_temp_files())


class TestCacheFuzz(CacheTestCase):
    """Mutated caches: never a traceback, never a changed input file."""

    def mutate(self, rng, data):
        data = bytearray(data)
        kind = rng.randrange(8)
        if kind == 0 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(len(data) + 1):]
        elif kind == 2:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
        elif kind == 3 and len(data) >= 32:
            data[28:32] = rng.randrange(-2 ** 31, 2 ** 31).to_bytes(4, "little", signed=True)
        elif kind == 4 and len(data) >= 32:
            data[24 + rng.randrange(8)] = rng.randrange(256)
        elif kind == 5 and len(data) >= 32:
            data[rng.randrange(21)] ^= 1 << rng.randrange(8)
        elif kind == 6 and data:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randint(1, 16))
        elif kind == 7 and len(data) > 40:
            # Wipe a field's NUL terminator or time.
            at = rng.randrange(32, len(data) - 8)
            data[at:at + 8] = rng.choice([b"\xff" * 8, b"A" * 8, bytes(8)])
        return bytes(data)

    def test_mutated_caches(self):
        rng = random.Random(3)
        iterations = 20000 if FUZZ_FULL else 2000
        seeds = [make_cache([(b"Vol%04d" % i, b"key-%d" % i, self.T + i) for i in range(n)],
                            psize, big) for n in (0, 1, 3) for psize in (4, 8)
                 for big in (False, True)]
        if os.path.isdir(FIXTURES):
            seeds.append(read_bytes(fixture("cache", "basic.cryptoc")))
        outcomes = {"read": 0, "refused": 0}
        saved = sys.stderr
        for it in range(iterations):
            data = rng.choice(seeds)
            for _ in range(rng.randint(1, 3)):
                data = self.mutate(rng, data)
            self.put(data)
            before = self.snapshot()
            sys.stderr = io.StringIO()
            try:
                try:
                    cache = bscrypto.read_cache(self.cache)
                except bscrypto.CacheError as e:
                    self.assertEqual(str(e).count("\n"), 0)
                    outcomes["refused"] += 1
                    cache = None
                if cache is not None:
                    outcomes["read"] += 1
                    bscrypto.format_cache_table(cache.entries)
                    bscrypto.cache_to_json(cache, self.cache, self.T)
                    try:
                        bscrypto.format_cache_tsv(cache.entries)
                    except bscrypto.CacheError:
                        pass
                    bscrypto.build_cache(cache.entries, cache.layout)
            finally:
                sys.stderr = saved
            self.assertEqual(self.snapshot(), before, it)
            if it % 10 == 0:
                for args in (["-D", self.cache], ["export", self.cache],
                             ["lookup", "Vol0001", self.cache]):
                    rc, _, err = cli(*args)
                    self.assertIn(rc, (0, bscrypto.EXIT_CACHE, bscrypto.EXIT_NOT_FOUND), err)
                    self.assertNotIn("Traceback", err)
                    self.assertEqual(self.snapshot(), before, (it, args))
                rc, _, err = self.populate("FuzzVol\tk\n", "--now", str(self.T))
                self.assertIn(rc, (0, bscrypto.EXIT_CACHE), err)
                if rc:
                    self.assertEqual(self.snapshot(), before, it)
                else:
                    self.assertIn("FuzzVol", [e[0] for e in self.entries()])
        self.assertGreater(outcomes["read"], iterations // 10)
        self.assertGreater(outcomes["refused"], iterations // 10)


# ---------------------------------------------------------------------------
# SCSI transport, SSC pages and the emulated drive
# ---------------------------------------------------------------------------

# (drive tests)


# ---------------------------------------------------------------------------
# Volume label and disaster recovery
# ---------------------------------------------------------------------------

# (recovery tests)


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


@bench
def bench_cache():
    """populate (new cache from stdin), dump (-D table), reset: 10k and 100k entries.

    The sizes alternate within each round, so both see the same machine load;
    best of 5 rounds.
    """
    import shutil
    import time
    tmp = tempfile.mkdtemp()
    key = b"xDKY4DNAShB+DvcIxsManYmT3M+82iYGVwv+JXl01/sPLk5q7VCrTw"
    now = CACHE_FIXTURE_TIME
    sizes = ((10000, "10k"), (100000, "100k"))
    inputs = {n: b"".join(b"Vol%07d\t%s\n" % (i, key) for i in range(n)) for n, _ in sizes}
    best = {}
    saved = bscrypto.DEBUG_LEVEL
    bscrypto.DEBUG_LEVEL = 0
    try:
        for _ in range(5):
            for n, label in sizes:
                path = os.path.join(tmp, "c" + label)
                sink = io.BytesIO()
                times = [time.perf_counter()]
                bscrypto.op_populate_cache(path, now=now, stream=io.BytesIO(inputs[n]),
                                           interactive=False)
                times.append(time.perf_counter())
                bscrypto.op_dump_cache(path, out=sink)
                times.append(time.perf_counter())
                bscrypto.op_reset_cache(path, now=now + 1)
                times.append(time.perf_counter())
                assert sink.getvalue().count(b"\n") == n + 1
                os.unlink(path)
                for op, t0, t1 in zip(("populate", "dump", "reset"), times, times[1:]):
                    k = "cache %s %s ms" % (op, label)
                    best[k] = min(best.get(k, float("inf")), (t1 - t0) * 1000)
    finally:
        bscrypto.DEBUG_LEVEL = saved
        shutil.rmtree(tmp)
    for op in ("populate", "dump", "reset"):
        best["cache %s 100k/10k" % op] = best["cache %s 100k ms" % op] / best["cache %s 10k ms" % op]
    return best


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
