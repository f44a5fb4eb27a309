// kiln's v86 machine under Node: `node v86.mjs JOB.json`, started by kiln-web's session
// module (kiln boot, kiln prepare --warm). Everything in JOB was checked and written by kiln:
// the v86 options, files to load whole (BIOS, kernel, initrd, disk, a saved state), the 9p
// filesystem (kiln's index; content files fetched from a directory when the guest reads them).
//
//   stdin            serial input (COM1), raw bytes
//   stdout           serial output (COM1), raw bytes
//   fd JOB.ctl_fd    control, one JSON object per line each way:
//                      kiln -> {"cmd":"save","path":P} (stop, write the raw state to P),
//                              {"cmd":"run"}, {"cmd":"quit"}
//                      this -> {"ev":"loaded","ms":N}, {"ev":"saved","bytes":N},
//                              {"ev":"error","message":M}
//   fd JOB.net_fd    optional: a network card's frames, each after its length as a 4-byte
//                    big-endian number (QEMU's stream protocol, what passt speaks)
import fs from "node:fs";
import net from "node:net";
import { pathToFileURL } from "node:url";

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { V86 } = await import(pathToFileURL(job.libv86).href);
const MAX_FRAME = 65536;

const buf = (p) => {
  const b = fs.readFileSync(p);
  return { buffer: b.buffer.slice(b.byteOffset, b.byteOffset + b.length) };
};
const opts = {
  ...job.options,
  wasm_path: job.wasm,
  autostart: true,
  disable_keyboard: true,
  disable_mouse: true,
  disable_speaker: true,
};
for (const [name, path] of Object.entries(job.files)) opts[name] = buf(path);
if (job.filesystem) {
  opts.filesystem = { baseurl: job.filesystem.baseurl };
  if (job.filesystem.basefs) opts.filesystem.basefs = job.filesystem.basefs;
}

const ctl = new net.Socket({ fd: job.ctl_fd, readable: true, writable: true });
const tell = (o) => ctl.write(JSON.stringify(o) + "\n");
const fail = (message) => {
  tell({ ev: "error", message: String(message) });
  setTimeout(() => process.exit(3), 50);
};
process.on("uncaughtException", (e) => fail(e && e.stack ? e.stack.split("\n")[0] : e));

const t0 = Date.now();
const emu = new V86(opts);

// Serial output, batched per turn of the event loop.
let pending = [];
emu.add_listener("serial0-output-byte", (b) => {
  if (pending.length === 0) setImmediate(flush);
  pending.push(b);
});
function flush() {
  const out = Buffer.from(pending);
  pending = [];
  process.stdout.write(out);
}
process.stdin.on("data", (d) => emu.serial0_send(d.toString("latin1")));
process.stdin.on("error", () => {});
process.stdout.on("error", () => process.exit(0));

emu.add_listener("emulator-loaded", () => tell({ ev: "loaded", ms: Date.now() - t0 }));

if (job.net_fd !== undefined && job.net_fd !== null) {
  const sock = new net.Socket({ fd: job.net_fd, readable: true, writable: true });
  let acc = Buffer.alloc(0);
  sock.on("data", (d) => {
    acc = acc.length ? Buffer.concat([acc, d]) : d;
    while (acc.length >= 4) {
      const n = acc.readUInt32BE(0);
      if (n > MAX_FRAME) {
        sock.destroy();
        return;
      }
      if (acc.length < 4 + n) break;
      emu.bus.send("net0-receive", new Uint8Array(acc.subarray(4, 4 + n)));
      acc = acc.subarray(4 + n);
    }
  });
  sock.on("error", () => {});
  emu.add_listener("net0-send", (frame) => {
    if (frame.length > MAX_FRAME) return;
    const head = Buffer.alloc(4);
    head.writeUInt32BE(frame.length, 0);
    sock.write(Buffer.concat([head, Buffer.from(frame)]));
  });
}

let line = "";
ctl.on("data", async (d) => {
  line += d.toString("utf8");
  let i;
  while ((i = line.indexOf("\n")) >= 0) {
    const text = line.slice(0, i);
    line = line.slice(i + 1);
    let cmd;
    try {
      cmd = JSON.parse(text);
    } catch {
      continue;
    }
    try {
      if (cmd.cmd === "save") {
        await emu.stop();
        const state = await emu.save_state();
        fs.writeFileSync(cmd.path, new Uint8Array(state));
        tell({ ev: "saved", bytes: state.byteLength });
      } else if (cmd.cmd === "run") {
        await emu.run();
      } else if (cmd.cmd === "quit") {
        flush();
        emu.destroy();
        process.exit(0);
      }
    } catch (e) {
      fail(e);
    }
  }
});
ctl.on("end", () => process.exit(0));
ctl.on("error", () => process.exit(0));
