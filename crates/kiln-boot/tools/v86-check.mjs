// Manual check of the boot program on v86 (the browser x86 emulator) under Node.
//   cargo run -p kiln-boot --example write_boot -- /tmp/kb      # writes boot.img
//   mkdir -p /tmp/v86test && cd /tmp/v86test && npm install v86
//   cp <this file> run.mjs && node run.mjs noacpi /tmp/kb/boot.img
//   node run.mjs acpi /tmp/kb/boot.img
// Checks banner + REPL, that nothing powers off by itself, and (with ACPI) that a
// simulated power-button press makes the program write SLP_EN|SLP_TYP to PM1a_CNT
// (v86 does not power off, so the REPL must keep working afterwards).
import { V86 } from "v86";
import fs from "node:fs";
const acpi = process.argv[2] === "acpi";
const img = fs.readFileSync(process.argv[3] || "/tmp/kb/boot.img");
const emu = new V86({
  wasm_path: new URL("./node_modules/v86/build/v86.wasm", import.meta.url).pathname,
  bios: { buffer: fs.readFileSync("/usr/share/seabios/bios.bin").buffer },
  vga_bios: { buffer: fs.readFileSync("/usr/share/seabios/vgabios-stdvga.bin").buffer },
  hda: { buffer: img.buffer.slice(img.byteOffset, img.byteOffset + img.length) },
  autostart: true, acpi,
});
let out = "";
const t0 = Date.now();
emu.add_listener("serial0-output-byte", (b) => { out += String.fromCharCode(b); });
let stopped = false;
emu.add_listener("emulator-stopped", () => { stopped = true; });
const wait = async (pat, ms = 30000) => { const end = Date.now() + ms; while (!out.includes(pat)) { if (Date.now() > end) throw new Error("timeout waiting for " + JSON.stringify(pat) + " got " + JSON.stringify(out)); await new Promise(r => setTimeout(r, 20)); } const i = out.indexOf(pat) + pat.length; const got = out.slice(0, i); out = out.slice(i); return got; };
const check = async (inp, exp) => { emu.serial0_send(inp); const got = await wait(exp); console.log((got === exp ? "ok  " : "BAD ") + JSON.stringify(inp.slice(0, 20)) + " -> " + JSON.stringify(got.slice(0, 24)) + " len " + got.length); if (got !== exp) process.exit(1); };
try {
  const b = await wait("ClientAPI\r\n");
  console.log(`acpi=${acpi} banner after ${(Date.now() - t0) / 1000}s: ${JSON.stringify(b)}`);
  await check("hello\r", "olleh\r\n");
  await check("hello\n", "olleh\r\n");
  await check("hello\r\n", "olleh\r\n");
  await check("ab\r\n", "ba\r\n");
  const s80 = Array.from({ length: 80 }, (_, i) => String.fromCharCode(33 + (i * 7) % 90)).join("");
  await check(s80 + "\r", [...s80].reverse().join("") + "\r\n");
  const s100 = Array.from({ length: 100 }, (_, i) => String.fromCharCode(48 + (i * 11) % 70)).join("");
  await check(s100 + "\n", [...s100.slice(0, 80)].reverse().join("") + "\r\n");
  await new Promise(r => setTimeout(r, 3000));
  const running = emu.is_running();
  const regs = emu.v86.cpu.reg16 ? Array.from(emu.v86.cpu.reg16.slice(0, 16)) : null;
  console.log(`after 3s idle: running=${running} stopped_event=${stopped} extra_output=${JSON.stringify(out)}`);
  if (regs) console.log("reg16 (ax,cx,dx,bx,sp,bp,si,di as 16-bit slots):", regs.filter((_, i) => i % 2 == 0).map(x => x.toString(16)).join(" "));
  const cpu = emu.v86.cpu;
  const r32 = cpu.reg32 || (cpu.wm && new Int32Array(cpu.wm.exports.memory.buffer, 64, 8));
  if (r32) console.log("eax ecx edx ebx esp ebp esi edi:", Array.from(r32).map(x => (x >>> 0).toString(16)).join(" "));
  const acpiDev = cpu.devices.acpi;
  if (acpiDev) {
    console.log(`pm1_enable=${acpiDev.pm1_enable.toString(16)} status(PM1_CNT)=${acpiDev.status.toString(16)}`);
    acpiDev.pm1_status |= 0x100; // simulate the power button
    await new Promise(r => setTimeout(r, 1000));
    console.log(`after simulated press: pm1_status=${acpiDev.pm1_status.toString(16)} PM1_CNT=${acpiDev.status.toString(16)}`);
    await check("still\r", "llits\r\n");
  }
  if (!running || stopped) { console.log("FAIL: stopped"); process.exit(1); }
  console.log("PASS v86");
} catch (e) { console.log("FAIL", e.message); process.exitCode = 1; }
emu.destroy();
process.exit(process.exitCode || 0);
