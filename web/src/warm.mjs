// kiln prepare --warm: boot a prepared VM in v86 under Node until a marker appears on serial, then
// save the machine state. Invoked by kiln-web as `node warm.mjs JOB.json`; JOB names the files
// (paths on disk) and the same kiln.json the page uses, so the saved state matches the page's
// machine exactly. Prints one JSON line {"serial": "...", "raw_size": N, "ms": N} on success.
import fs from "node:fs";
import { pathToFileURL } from "node:url";

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { V86 } = await import(pathToFileURL(job.libv86).href);
const cfg = job.config;
const buf = (p) => {
  const b = fs.readFileSync(p);
  return { buffer: b.buffer.slice(b.byteOffset, b.byteOffset + b.length) };
};

const opts = {
  wasm_path: job.wasm,
  memory_size: cfg.memory_size,
  vga_memory_size: cfg.vga_memory_size,
  bios: buf(job.bios),
  vga_bios: buf(job.vga_bios),
  autostart: true,
  disable_keyboard: true,
  disable_mouse: true,
  disable_speaker: true,
};
opts[cfg.disk.kind] = buf(job.disk);

const t0 = Date.now();
const emu = new V86(opts);
let serial = "";
let done = false;
const decoder = new TextDecoder();

const timer = setTimeout(() => {
  process.stderr.write(
    `marker ${JSON.stringify(job.marker)} did not appear on serial within ${job.timeout_ms} ms; serial so far: ${JSON.stringify(serial.slice(-200))}\n`,
  );
  process.exit(3);
}, job.timeout_ms);

emu.add_listener("serial0-output-byte", async (b) => {
  serial += decoder.decode(new Uint8Array([b]), { stream: true });
  if (done || !serial.includes(job.marker)) return;
  done = true;
  // Let the guest finish the line it is printing (e.g. "\r\n" after the marker) before saving.
  await new Promise((r) => setTimeout(r, 50));
  emu.stop();
  const state = await emu.save_state();
  fs.writeFileSync(job.out_state, new Uint8Array(state));
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ serial, raw_size: state.byteLength, ms: Date.now() - t0 }) + "\n");
  emu.destroy();
  process.exit(0);
});
