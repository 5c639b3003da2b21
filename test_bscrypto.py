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
