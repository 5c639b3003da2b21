"""Minimal tape drive model for bringing up the TCMU harness.

Used by tcmu_tape.py only when test_bscrypto.EmulatedTapeDrive is not
available.  It answers what Linux's st driver needs to attach, open, read
and write variable-size blocks (see README.md for the opcodes st sends),
plus a plausible subset of tape data encryption (SPIN/SPOUT protocol 0x20)
so bscrypto's commands have something to talk to.  It is not a reference
for drive behaviour: test_bscrypto's model is.

execute(cdb, data_out, alloc_len) -> (status, data_in, sense), with fixed
format sense when status is 2 (CHECK CONDITION).
"""

GOOD, CHECK_CONDITION = 0, 2
NO_SENSE, ILLEGAL_REQUEST = 0, 5
DATA_PROTECT, BLANK_CHECK = 7, 8

FILEMARK = object()
MAX_BLOCK = 0x800000             # READ BLOCK LIMITS maximum, as LTO drives say
TDE_PROTOCOL = 0x20              # tape data encryption security protocol
AES256_GCM = 0x00010014


def sense(key, asc=0, ascq=0, info=None, filemark=False, ili=False):
    """Fixed-format sense data (SPC-4 4.5.3)."""
    s = bytearray(18)
    s[0] = 0x70
    s[2] = key | (0x80 if filemark else 0) | (0x20 if ili else 0)
    s[7] = 10
    s[12], s[13] = asc, ascq
    if info is not None:
        s[0] |= 0x80             # VALID: the information field means something
        s[3:7] = (info & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(s)


def check(key, asc=0, ascq=0, **kw):
    return CHECK_CONDITION, b"", sense(key, asc, ascq, **kw)


def invalid_field():
    return check(ILLEGAL_REQUEST, 0x24, 0x00)


class Block:
    """One written logical block and the key it was encrypted with (if any)."""

    def __init__(self, data, key):
        self.data = data
        self.key = key


class BringupDrive:
    def __init__(self):
        self.records = []        # Block or FILEMARK
        self.pos = 0             # index into records (logical object number)
        self.block_size = 0      # 0 = variable-block mode
        self.encrypt_mode = 0    # Set Data Encryption fields (SSC-4 8.5.3)
        self.decrypt_mode = 0
        self.key = None
        self.key_instance = 0

    def execute(self, cdb, data_out, alloc_len):
        handler = getattr(self, "op_%02x" % cdb[0], None)
        if handler is None:
            return check(ILLEGAL_REQUEST, 0x20, 0x00)   # invalid opcode
        status, data, sns = handler(cdb, data_out)
        return status, data[:alloc_len], sns

    # ---- commands without data ----

    def op_00(self, cdb, data_out):              # TEST UNIT READY
        return GOOD, b"", b""

    def op_01(self, cdb, data_out):              # REWIND
        self.pos = 0
        return GOOD, b"", b""

    op_16 = op_17 = op_1e = op_00                # RESERVE/RELEASE, PREVENT ALLOW

    def op_1b(self, cdb, data_out):              # LOAD UNLOAD
        self.pos = 0
        return GOOD, b"", b""

    def op_19(self, cdb, data_out):              # ERASE: from here to the end
        del self.records[self.pos:]
        return GOOD, b"", b""

    def op_10(self, cdb, data_out):              # WRITE FILEMARKS(6)
        count = int.from_bytes(cdb[2:5], "big")
        del self.records[self.pos:]
        self.records.extend([FILEMARK] * count)
        self.pos += count
        return GOOD, b"", b""

    def op_11(self, cdb, data_out):              # SPACE(6)
        code = cdb[1] & 0x07
        count = int.from_bytes(cdb[2:5], "big", signed=True)
        if code == 3:                            # end of data
            self.pos = len(self.records)
            return GOOD, b"", b""
        if code not in (0, 1):                   # blocks, filemarks only
            return invalid_field()
        step = 1 if count >= 0 else -1
        remaining = abs(count)
        while remaining:
            nxt = self.pos if step > 0 else self.pos - 1
            if not 0 <= nxt < len(self.records):
                if step > 0:                     # end of data
                    return check(BLANK_CHECK, 0x00, 0x05, info=remaining)
                return check(NO_SENSE, 0x00, 0x04, info=remaining)  # BOP
            self.pos += step
            if self.records[nxt] is FILEMARK:
                if code == 0:                    # spacing blocks stops here
                    return check(NO_SENSE, 0x00, 0x01, filemark=True,
                                 info=remaining)
                remaining -= 1
            elif code == 0:
                remaining -= 1
        return GOOD, b"", b""

    # ---- data in ----

    def op_03(self, cdb, data_out):              # REQUEST SENSE: nothing pending
        return GOOD, sense(NO_SENSE), b""

    def op_05(self, cdb, data_out):              # READ BLOCK LIMITS
        return GOOD, bytes([0]) + MAX_BLOCK.to_bytes(3, "big") + (1).to_bytes(2, "big"), b""

    def op_12(self, cdb, data_out):              # INQUIRY
        if cdb[1] & 1:
            return self.vpd(cdb[2])
        data = bytearray(36)
        data[0] = 0x01                           # sequential-access device
        data[1] = 0x80                           # removable medium
        data[2], data[3], data[4] = 0x06, 0x02, 36 - 5   # SPC-4
        data[8:36] = b"SYSTEST BRINGUP TAPE    0001"
        return GOOD, bytes(data), b""

    def vpd(self, page):
        if page == 0x00:
            return GOOD, bytes([0x01, 0x00, 0x00, 2, 0x00, 0x80]), b""
        if page == 0x80:
            serial = b"BRINGUP0001"
            return GOOD, bytes([0x01, 0x80, 0x00, len(serial)]) + serial, b""
        return invalid_field()

    def op_1a(self, cdb, data_out):              # MODE SENSE(6)
        page = cdb[2] & 0x3F
        pages = {0x00: b"", 0x10: self.device_config_page(),
                 0x0F: self.compression_page()}
        if page == 0x3F:
            body = pages[0x0F] + pages[0x10]
        elif page in pages:
            body = pages[page]
        else:
            return invalid_field()
        descriptor = b"" if cdb[1] & 0x08 else self.block_descriptor()
        # Header: length, medium type, device-specific (buffered mode 1), BD length.
        head = bytes([3 + len(descriptor) + len(body), 0, 0x10, len(descriptor)])
        return GOOD, head + descriptor + body, b""

    def block_descriptor(self):
        return bytes([0x58, 0, 0, 0, 0]) + self.block_size.to_bytes(3, "big")

    @staticmethod
    def device_config_page():
        return bytes([0x10, 14] + [0] * 14)

    @staticmethod
    def compression_page():
        return bytes([0x0F, 14, 0xC0, 0x80] + [0] * 12)

    def op_15(self, cdb, data_out):              # MODE SELECT(6)
        if len(data_out) >= 12 and data_out[3] >= 8:
            self.block_size = int.from_bytes(data_out[9:12], "big")
        return GOOD, b"", b""

    def op_34(self, cdb, data_out):              # READ POSITION, short form
        if cdb[1] & 0x1F not in (0, 1):
            return invalid_field()
        data = bytearray(20)
        data[0] = 0x80 if self.pos == 0 else 0   # BOP
        data[4:8] = self.pos.to_bytes(4, "big")
        data[8:12] = self.pos.to_bytes(4, "big")
        return GOOD, bytes(data), b""

    def op_2b(self, cdb, data_out):              # LOCATE(10)
        self.pos = min(int.from_bytes(cdb[3:7], "big"), len(self.records))
        return GOOD, b"", b""

    def op_08(self, cdb, data_out):              # READ(6), variable blocks
        if cdb[1] & 0x01:
            return invalid_field()               # fixed mode is not emulated
        want = int.from_bytes(cdb[2:5], "big")
        if self.pos >= len(self.records):
            return check(BLANK_CHECK, 0x00, 0x05, info=want)     # end of data
        record = self.records[self.pos]
        self.pos += 1
        if record is FILEMARK:
            return check(NO_SENSE, 0x00, 0x01, filemark=True, info=want)
        if record.key is not None and (self.decrypt_mode not in (2, 3)
                                       or record.key != self.key):
            self.pos -= 1
            return check(DATA_PROTECT, 0x74, 0x01)  # unable to decrypt data
        data = record.data
        if len(data) == want or (cdb[1] & 0x02 and len(data) < want):
            return GOOD, data, b""
        # Incorrect length: ILI, information = requested minus actual.
        return (CHECK_CONDITION, data[:want],
                sense(NO_SENSE, ili=True, info=want - len(data)))

    # ---- data out ----

    def op_0a(self, cdb, data_out):              # WRITE(6), variable blocks
        if cdb[1] & 0x01:
            return invalid_field()
        del self.records[self.pos:]
        key = self.key if self.encrypt_mode == 2 else None
        self.records.append(Block(bytes(data_out), key))
        self.pos += 1
        return GOOD, b"", b""

    # ---- tape data encryption (SPC-4 SECURITY PROTOCOL IN/OUT, SSC-4 8.5) ----

    def op_a2(self, cdb, data_out):              # SECURITY PROTOCOL IN
        protocol, page = cdb[1], int.from_bytes(cdb[2:4], "big")
        if protocol == 0x00 and page == 0x0000:
            return GOOD, bytes([0, 0, 0, 0, 0, 0, 0, 2, 0x00, TDE_PROTOCOL]), b""
        if protocol != TDE_PROTOCOL:
            return invalid_field()
        pages = {0x0000: self.supported_pages, 0x0010: self.capabilities,
                 0x0020: self.data_encryption_status,
                 0x0021: self.next_block_status}
        if page not in pages:
            return invalid_field()
        body = pages[page]()
        return GOOD, page.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body, b""

    @staticmethod
    def supported_pages():
        pages = (0x0000, 0x0010, 0x0020, 0x0021)
        return b"".join(p.to_bytes(2, "big") for p in pages)

    @staticmethod
    def capabilities():
        # One algorithm descriptor: index 1, AES-256-GCM, 32-byte key,
        # DECRYPT_C and ENCRYPT_C = 2 (capable in hardware).
        desc = bytearray(24)
        desc[0], desc[3] = 1, 20
        desc[4] = 0x0A
        desc[10:12] = (32).to_bytes(2, "big")
        desc[20:24] = AES256_GCM.to_bytes(4, "big")
        return bytes(16) + bytes(desc)

    def data_encryption_status(self):
        body = bytearray(20)
        body[0] = 0x42                           # scope: all I_T nexus / public
        body[1], body[2] = self.encrypt_mode, self.decrypt_mode
        body[3] = 1 if self.encrypt_mode or self.decrypt_mode else 0
        body[4:8] = self.key_instance.to_bytes(4, "big")
        body[8] = 0x10                           # parameters set by application
        if any(r is not FILEMARK and r.key is not None for r in self.records):
            body[8] |= 0x08                      # VCELB
        return bytes(body)

    def next_block_status(self):
        body = bytearray(12)
        body[0:8] = self.pos.to_bytes(8, "big")
        record = self.records[self.pos] if self.pos < len(self.records) else None
        if record is None or record is FILEMARK:
            status = 2                           # not a logical block
        elif record.key is None:
            status = 3                           # not encrypted
        elif self.decrypt_mode in (2, 3) and record.key == self.key:
            status = 5                           # encrypted, decryptable
        else:
            status = 6                           # encrypted, no valid key
        body[8] = status
        body[9] = 1 if status >= 5 else 0
        return bytes(body)

    def op_b5(self, cdb, data_out):              # SECURITY PROTOCOL OUT
        page = int.from_bytes(cdb[2:4], "big")
        if cdb[1] != TDE_PROTOCOL or page != 0x0010 or len(data_out) < 20:
            return invalid_field()
        encrypt, decrypt = data_out[6], data_out[7]
        key_len = int.from_bytes(data_out[18:20], "big")
        key = bytes(data_out[20:20 + key_len])
        if encrypt not in (0, 2) or decrypt not in (0, 1, 2, 3) or \
                (encrypt == 2 and key_len != 32):
            return check(ILLEGAL_REQUEST, 0x26, 0x00)
        self.encrypt_mode, self.decrypt_mode = encrypt, decrypt
        self.key = key if (encrypt or decrypt) and any(key) else None
        self.key_instance += 1
        return GOOD, b"", b""
