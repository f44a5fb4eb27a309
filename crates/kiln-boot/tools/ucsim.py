# Emulate the kiln boot program under Unicorn with synthetic firmware tables
# (VirtualBox / Hyper-V / QEMU / v86-like layouts) and fake UART + ACPI PM ports:
# checks the FADT/DSDT discovery, the SLP_TYP parsing and the fallbacks.
#   python3 -m venv /tmp/uc && /tmp/uc/bin/pip install unicorn
#   cargo run -p kiln-boot --example write_boot -- /tmp/kb
#   /tmp/uc/bin/python ucsim.py /tmp/kb/boot.bin
import struct, sys
from unicorn import *
from unicorn.x86_const import *

PROG = open(sys.argv[1] if len(sys.argv) > 1 else "boot.bin", "rb").read()
HIGH = 0x3FFF0000

def sdt(sig, body, length=None):
    hdr = sig + struct.pack("<I", 36 + len(body)) + b"\x01\x00" + b"KILNTS" + b"TESTTBL " + b"\0" * 12
    assert len(hdr) == 36
    return hdr + body

def tables(pm_evt, pm_cnt, s5_aml, first_entry=b"FACP", rsdp_at=0xE0000, dsdt_junk=4000):
    mem = {}
    rsdt_addr, facp_addr, dsdt_addr, apic_addr = HIGH, HIGH + 0x100, HIGH + 0x400, HIGH + 0x200
    rsdp = b"RSD PTR " + b"\0" + b"KILNTS" + b"\0" + struct.pack("<I", rsdt_addr)
    mem[rsdp_at] = rsdp
    entries = [facp_addr] if first_entry == b"FACP" else [apic_addr, facp_addr]
    mem[rsdt_addr] = sdt(b"RSDT", b"".join(struct.pack("<I", e) for e in entries))
    body = bytearray(116 - 36)
    struct.pack_into("<I", body, 40 - 36, dsdt_addr)
    struct.pack_into("<I", body, 56 - 36, pm_evt)
    struct.pack_into("<I", body, 64 - 36, pm_cnt)
    mem[facp_addr] = sdt(b"FACP", bytes(body))
    mem[apic_addr] = sdt(b"APIC", b"\0" * 8)
    junk = bytes((i * 37 + 11) % 251 for i in range(dsdt_junk)).replace(b"_", b"x")
    mem[dsdt_addr] = sdt(b"DSDT", junk + s5_aml + b"\x14\x0a_PTS\x01")
    return mem

class Machine:
    def __init__(self, mem, pm=None):
        self.uc = Uc(UC_ARCH_X86, UC_MODE_16)
        self.uc.mem_map(0, 0x100000)
        self.uc.mem_map(HIGH, 0x20000)
        self.uc.mem_write(0x7C00, PROG)
        for a, b in mem.items(): self.uc.mem_write(a, b)
        self.uc.reg_write(UC_X86_REG_SP, 0x7000)
        self.pm = pm  # (evt, cnt) ports implemented, or None: all-ones
        self.sts = 0; self.en = 0; self.cnt_writes = []
        self.dlab = False; self.lcr = 0; self.div = [None, None]
        self.inp = bytearray(); self.out = bytearray(); self.screen = bytearray()
        self.powered_off = False; self.ins = 0; self.idle = 0
        self.uc.hook_add(UC_HOOK_INSN, self.on_in, None, 1, 0, UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self.on_out, None, 1, 0, UC_X86_INS_OUT)
        self.uc.hook_add(UC_HOOK_INTR, self.on_intr)
        self.ip = 0x7C00
    def on_intr(self, uc, intno, _):
        assert intno == 0x10, intno
        ax = uc.reg_read(UC_X86_REG_AX); bx = uc.reg_read(UC_X86_REG_BX)
        assert ax >> 8 == 0x0E and bx >> 8 == 0, (hex(ax), hex(bx))
        self.screen.append(ax & 0xFF)
    def on_in(self, uc, port, size, _):
        self.ins += 1
        if self.ins > 200000: uc.emu_stop()
        if port == 0x3FD: 
            self.idle = self.idle + 1 if not self.inp else 0
            if self.idle > 500: uc.emu_stop()  # idle: waiting for input
            return 0x60 | (1 if self.inp else 0)
        if port == 0x3F8: return self.inp.pop(0) if self.inp else 0
        if self.pm and port == self.pm[0] and size == 2: return self.sts
        if self.pm and port == self.pm[0] + 2 and size == 2: return self.en
        return (1 << (8 * size)) - 1
    def on_out(self, uc, port, size, value, _):
        for i in range(size):  # 8-bit devices see byte writes, low first
            p, v = port + i, (value >> (8 * i)) & 0xFF
            if self.pm and port in (self.pm[0], self.pm[0] + 2, self.pm[1]): break
            if p == 0x3FB: self.lcr = v; self.dlab = bool(v & 0x80)
            elif p in (0x3F8, 0x3F9) and self.dlab: self.div[p - 0x3F8] = v
            elif p == 0x3F8: self.out.append(v)
        if self.pm and port == self.pm[0]: self.sts &= ~value
        if self.pm and port == self.pm[0] + 2: self.en = value
        if self.pm and port == self.pm[1]:
            self.cnt_writes.append(value)
            if value & 0x2000: self.powered_off = True; uc.emu_stop()
    def run(self):
        self.ins = 0; self.idle = 0
        self.uc.emu_start(self.ip, 0xFFFFFFFF, count=2_000_000)
        self.ip = self.uc.reg_read(UC_X86_REG_EIP)
    def say(self, data):
        self.inp += data; self.run(); r = bytes(self.out); self.out.clear(); return r
    def press(self):
        if self.en & 0x100: self.sts |= 0x100
        self.run()

def scenario(name, mem, pm, expect_cnt):
    m = Machine(mem, pm)
    m.run()
    ok = True
    def chk(c, what):
        nonlocal ok
        if not c: ok = False; print("   FAIL:", what)
    chk(bytes(m.out) == b"ClientAPI\r\n" and bytes(m.screen) == b"ClientAPI\r\n", f"banner {bytes(m.out)!r} {bytes(m.screen)!r}")
    chk(m.div == [12, 0] and m.lcr == 3, f"uart div {m.div} lcr {m.lcr}")
    m.out.clear()
    chk(m.say(b"hello\r\n") == b"olleh\r\n", "hello")
    chk(m.say(b"x" * 90 + b"yz\n") == b"x" * 80 + b"\r\n", "long")
    bp, si, bx = (m.uc.reg_read(r) for r in (UC_X86_REG_BP, UC_X86_REG_SI, UC_X86_REG_BX))
    m.press()
    if expect_cnt is None:
        chk(not m.powered_off and not m.cnt_writes, f"no power-off expected, got {m.cnt_writes}")
    else:
        chk(m.powered_off and m.cnt_writes == [expect_cnt], f"CNT writes {[hex(x) for x in m.cnt_writes]}, want {expect_cnt:#x}")
        chk(m.sts & 0x100 == 0, "PWRBTN_STS cleared")
    chk(m.say(b"ab\r") == b"ba\r\n", "REPL after press")
    print(f"{'PASS' if ok else 'FAIL'} {name}: bp={bp:#x} si={si:#x} bx={bx:#x} cnt={[hex(x) for x in m.cnt_writes]}")
    return ok

S5 = lambda elems: b"\x08_S5_\x12" + bytes([len(elems) + 2, 2]) + elems
res = [
    scenario("VirtualBox-like (RSDP E0000, 0x4000/0x4004, _S5_ {0x05,0x05})",
             tables(0x4000, 0x4004, S5(b"\x0a\x05\x0a\x05")), (0x4000, 0x4004), 0x3400),
    scenario("Hyper-V-like (0x400/0x404, \\_S5_ {Zero,Zero})",
             tables(0x400, 0x404, b"\x08\\_S5_\x12\x06\x04\x00\x00\x00\x00", rsdp_at=0xF6A10), (0x400, 0x404), 0x2000),
    scenario("QEMU-like (0x600/0x604, _S5_ {Zero...}) + _S5D decoy",
             tables(0x600, 0x604, b"\x08_S5D\x0a\x03" + S5(b"\x00\x00")), (0x600, 0x604), 0x2000),
    scenario("v86-like (0xB000/0xB004, _S5_ {One,One}) at top of F segment",
             tables(0xB000, 0xB004, S5(b"\x01\x01"), rsdp_at=0xFFFE0), (0xB000, 0xB004), 0x2400),
    scenario("_S5_ at 60 KiB into the DSDT, SLP_TYP 7", tables(0x4000, 0x4004, S5(b"\x0a\x07\x0a\x07"), dsdt_junk=60000), (0x4000, 0x4004), 0x3C00),
    scenario("no _S5_: FADT ports, SLP_TYP 0", tables(0x4000, 0x4004, b""), (0x4000, 0x4004), 0x2000),
    scenario("no RSDP, PM at 0x600 (fallback)", {}, (0x600, 0x604), 0x2000),
    scenario("no RSDP, no PM hardware (all ones)", {}, None, None),
    scenario("first RSDT entry not FACP -> fallback to 0x600/0x604, S5=0", tables(0x4000, 0x4004, S5(b"\x0a\x05"), first_entry=b"APIC"), (0x600, 0x604), 0x2000),
    scenario("'RSD ' decoy without a valid RSDT -> fallback", {0xE0000: b"RSD PTR \0\0\0\0\0\0\0\0" + struct.pack("<I", HIGH + 0x8000)}, (0x600, 0x604), 0x2000),
]
print("ALL PASS" if all(res) else "SOME FAILED"); sys.exit(0 if all(res) else 1)
