/**
 * kiln.js: embed a kiln VM (v86) in a web page.
 *
 *     <div id="vm"></div>
 *     <script type="module">
 *       import { boot } from "./kiln.js";
 *       const vm = boot(document.getElementById("vm"));
 *       await vm.ready;                 // machine loaded and running
 *       vm.sendSerial("hello\r");       // type on COM1
 *       vm.onSerial((text) => ...);     // every chunk the guest writes to COM1
 *       vm.serialText();                // everything written to COM1 so far
 *       const s = await vm.saveState(); // ArrayBuffer
 *       await vm.restoreState(s);
 *       // Linux guests:
 *       await vm.waitFor("root@");       // until the text appears on serial
 *       const out = await vm.run("cat /etc/os-release"); // its output, up to the next prompt
 *       vm.onProgress(({ phase, loaded, total }) => ...); // state and file downloads
 *     </script>
 *
 * Every URL is resolved against the site's kiln.json (by default next to this file), never
 * against the site root, so a site works under any base path (https://host/a/b/demo/).
 *
 * options:
 *   config:   URL of the site's kiln.json (default: "kiln.json" beside kiln.js)
 *   terminal: element for an xterm.js serial terminal (created inside `element` when absent;
 *             null for none)
 *   warm:     false to cold-boot even when the site ships a saved state
 *   ctl:      false to not connect to `kiln serve`'s /ctl debug console when served by it
 *   onProgress: fn({phase: "state" | "files", loaded, total, file}) while the saved state and
 *             the files v86 loads whole (kernel, initrd, disk) download
 *
 * A site is a disk (kiln.json `disk`) or a Linux image (kiln.json `filesystem`: a 9p root whose
 * files v86 fetches from `baseurl` when the guest reads them; `bzimage`, `initrd`, `cmdline`
 * for a cold boot, which a warm start never fetches).
 *
 * The handle: ready (Promise of the handle), mode ("cold" | "warm"), emulator (the V86 object),
 * serialText(), sendSerial(text), onSerial(fn), terminalText(), saveState(), restoreState(buf),
 * pause(), resume(), reset(), destroy(), waitFor(text, {timeout}), run(command, {prompt,
 * timeout}), onProgress(fn).
 */

const HERE = new URL(".", import.meta.url);
// Terminal control sequences (colours, bracketed paste) in serial text.
const ANSI = /\x1b\[[0-9;?]*[ -\/]*[@-~]|\x1b[()][0-9A-B]/g;

/** Boot the site's VM inside `element`; returns the handle at once (await `handle.ready`). */
export function boot(element, options = {}) {
  return new KilnVM(element, options);
}

function loadScript(url, global) {
  if (globalThis[global]) return Promise.resolve();
  // index.html may already be loading it (a plain <script>): wait for that instead.
  const existing = [...document.scripts].find((s) => s.src === url.href);
  return new Promise((resolve, reject) => {
    const s = existing || document.createElement("script");
    const done = () => (globalThis[global] ? resolve() : reject(new Error(`${url} did not define ${global}`)));
    s.addEventListener("load", done);
    s.addEventListener("error", () => reject(new Error(`could not load ${url}`)));
    if (!existing) {
      s.src = url.href;
      document.head.appendChild(s);
    } else if (globalThis[global]) {
      resolve();
    }
  });
}

/** xterm.js's ES module build; sets `globalThis.Terminal` as its UMD build would. */
async function loadTerminal(url) {
  if (globalThis.Terminal) return;
  const { Terminal } = await import(url.href);
  globalThis.Terminal = Terminal;
}

async function fetchOk(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r;
}

function wsUrl(path, base) {
  const u = new URL(path, base);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.href;
}

/** Fetch a response's body, reporting each chunk's size to `onBytes`. */
async function readBody(r, onBytes) {
  if (!r.body || !r.body.getReader) {
    const b = new Uint8Array(await r.arrayBuffer());
    onBytes(b.length);
    return b;
  }
  const reader = r.body.getReader();
  const chunks = [];
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    n += value.length;
    onBytes(value.length);
  }
  const all = new Uint8Array(n);
  let off = 0;
  for (const c of chunks) {
    all.set(c, off);
    off += c.length;
  }
  return all;
}

/** Fetch a state manifest and its parts; returns {buffer, serial}. */
async function loadState(manifestUrl, progress) {
  const m = await (await fetchOk(manifestUrl)).json();
  let loaded = 0;
  const tick = (n) => {
    loaded += n;
    progress({ phase: "state", loaded, total: m.size });
  };
  tick(0);
  const parts = await Promise.all(
    m.parts.map(async (p) => readBody(await fetchOk(new URL(p.url, manifestUrl)), tick)),
  );
  const total = parts.reduce((n, p) => n + p.length, 0);
  if (total !== m.size) throw new Error(`${manifestUrl}: state is ${total} bytes, manifest says ${m.size}`);
  const all = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    all.set(p, off);
    off += p.length;
  }
  // v86 recognises the zstd magic and decompresses the state itself.
  return { buffer: all.buffer, serial: m.serial || "" };
}

class KilnVM {
  constructor(element, options) {
    this.element = element;
    this.options = options;
    this.mode = null;
    this.emulator = null;
    this.terminal = null;
    this._serial = "";
    this._listeners = [];
    this._decoder = new TextDecoder();
    this._ctl = null;
    this._progress = options.onProgress ? [options.onProgress] : [];
    this._waiters = [];
    this.ready = this._start();
  }

  async _start() {
    const configUrl = new URL(this.options.config || "kiln.json", HERE);
    // Compile v86 while everything else loads (kiln sites always ship it as v86.wasm).
    const compile = (url) => WebAssembly.compileStreaming(fetch(url));
    let wasmUrl = new URL("v86.wasm", configUrl).href;
    let wasm = compile(wasmUrl);
    wasm.catch(() => {});
    const cfg = await (await fetchOk(configUrl)).json();
    this.config = cfg;
    const u = (p) => new URL(p, configUrl).href;
    const wantTerm = this.options.terminal !== null;
    const progress = (p) => this._progress.forEach((fn) => fn(p));
    const warmP = cfg.state && this.options.warm !== false ? loadState(u(cfg.state), progress).catch((e) => {
      console.warn("kiln: saved state unusable, booting cold:", e);
      return null;
    }) : Promise.resolve(null);
    await Promise.all([
      loadScript(new URL(cfg.libv86 || "libv86.js", configUrl), "V86"),
      wantTerm ? loadTerminal(new URL(cfg.xterm || "xterm.mjs", configUrl)) : null,
    ]);

    const screen = document.createElement("div");
    screen.className = "kiln-screen";
    screen.innerHTML =
      '<div style="white-space: pre; font: 14px monospace; line-height: 14px"></div><canvas style="display: none"></canvas>';
    this.element.appendChild(screen);
    this.screen = screen;

    if (wantTerm) {
      let host = this.options.terminal;
      if (!host) {
        host = document.createElement("div");
        host.className = "kiln-terminal";
        this.element.appendChild(host);
      }
      this.terminal = new globalThis.Terminal({ convertEol: false, rows: 12, cols: 80, scrollback: 1000 });
      this.terminal.open(host);
      this.terminal.onData((d) => this.sendSerial(d));
    }

    const state = await warmP;
    if (u(cfg.wasm) !== wasmUrl) wasm = compile((wasmUrl = u(cfg.wasm)));
    const opts = {
      wasm_path: wasmUrl,
      wasm_fn: async (env) => (await WebAssembly.instantiate(await wasm, env)).exports,
      memory_size: cfg.memory_size,
      vga_memory_size: cfg.vga_memory_size,
      screen_container: screen,
      autostart: true,
      disable_mouse: true,
      disable_speaker: true,
    };
    if (cfg.disk) opts[cfg.disk.kind] = { url: u(cfg.disk.url), size: cfg.disk.size, async: false };
    if (cfg.filesystem) {
      // Linux: the root is v86's 9p filesystem; content files are fetched as the guest reads
      // them. A saved state holds the whole inode table, so a warm start needs only baseurl.
      opts.filesystem = { baseurl: u(cfg.filesystem.baseurl) };
      if (cfg.mac_address_translation) opts.mac_address_translation = true;
    }
    if (state) {
      // The state holds the BIOS (and a Linux kernel) in guest memory: a warm page never
      // fetches or runs firmware, a kernel or the 9p index.
      opts.initial_state = { buffer: state.buffer };
      this.mode = "warm";
    } else {
      opts.bios = { url: u(cfg.bios) };
      opts.vga_bios = { url: u(cfg.vga_bios) };
      if (cfg.filesystem) {
        opts.filesystem.basefs = u(cfg.filesystem.basefs);
        opts.bzimage = { url: u(cfg.bzimage) };
        if (cfg.initrd) opts.initrd = { url: u(cfg.initrd) };
        opts.cmdline = cfg.cmdline;
      }
      this.mode = "cold";
    }
    if (cfg.net) opts.net_device = { type: "ne2k", relay_url: wsUrl(cfg.net, configUrl) };

    const emu = new globalThis.V86(opts);
    this.emulator = emu;
    emu.add_listener("download-progress", (e) =>
      progress({ phase: "files", loaded: e.loaded, total: e.total, file: e.file_name }),
    );
    emu.add_listener("serial0-output-byte", (b) =>
      this._output(this._decoder.decode(new Uint8Array([b]), { stream: true })),
    );
    // "emulator-loaded" comes after the saved state is restored and the CPU started.
    await new Promise((resolve) => emu.add_listener("emulator-loaded", resolve));
    if (state && state.serial) this._output(state.serial);
    if (cfg.ctl && this.options.ctl !== false) this._connectCtl(wsUrl(cfg.ctl, configUrl));
    return this;
  }

  _output(text) {
    if (!text) return;
    this._serial += text;
    this._waiters = this._waiters.filter((w) => !w.check());
    if (this.terminal) this.terminal.write(text);
    for (const fn of this._listeners) fn(text);
    if (this._ctl && this._ctl.readyState === 1) this._ctl.send(JSON.stringify({ ev: "serial", data: text }));
  }

  /** All text the guest has written to COM1 so far (with a warm start: since the original boot). */
  serialText() {
    return this._serial;
  }

  /** Call `fn({phase, loaded, total, file})` while the state and v86's files download. */
  onProgress(fn) {
    this._progress.push(fn);
  }

  /**
   * Resolves with the serial text from now on once `test` (a string, or a RegExp tested on
   * the text with terminal escapes removed) is in it; rejects after `timeout` ms.
   */
  waitFor(test, { timeout = 30000, from = this._serial.length } = {}) {
    const match =
      typeof test === "string" ? (t) => t.includes(test) : (t) => test.test(t.replace(ANSI, ""));
    return new Promise((resolve, reject) => {
      const w = {
        check: () => {
          const t = this._serial.slice(from);
          if (!match(t)) return false;
          clearTimeout(w.timer);
          resolve(t);
          return true;
        },
      };
      if (w.check()) return;
      w.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((x) => x !== w);
        reject(new Error(`${test} did not appear on serial within ${timeout} ms`));
      }, timeout);
      this._waiters.push(w);
    });
  }

  /**
   * Types `command` and Enter on the serial console and resolves with what it printed: the
   * lines after the echoed command up to the next shell prompt (`prompt`, tested on the last
   * line; default: a line ending in "# " or "$ "), terminal escapes removed.
   */
  async run(command, { prompt = /[#$] $/, timeout = 30000 } = {}) {
    const from = this._serial.length;
    const done = (t) => {
      const nl = t.indexOf("\n");
      if (nl < 0) return false;
      const last = t.slice(t.lastIndexOf("\n") + 1);
      return t.lastIndexOf("\n") >= nl && prompt.test(last);
    };
    this.sendSerial(command + "\n");
    const untilPrompt = { test: done, toString: () => `the prompt after ${JSON.stringify(command)}` };
    const text = (await this.waitFor(untilPrompt, { timeout, from })).replace(ANSI, "");
    const lines = text.replace(/\r/g, "").split("\n");
    return lines.slice(1, -1).join("\n");
  }

  /** Type `text` on COM1 (use "\r" for Enter). */
  sendSerial(text) {
    if (this.emulator) this.emulator.serial0_send(text);
  }

  /** Call `fn(text)` for every chunk of serial output from now on. */
  onSerial(fn) {
    this._listeners.push(fn);
  }

  /** The serial terminal's visible text, lines joined with "\n" (trailing blanks trimmed). */
  terminalText() {
    if (!this.terminal) return "";
    const b = this.terminal.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join("\n").replace(/\n+$/, "");
  }

  /** The VGA text screen's content (text modes only). */
  screenText() {
    return this.screen ? this.screen.firstChild.innerText : "";
  }

  /** Save the whole machine; resolves to an ArrayBuffer for restoreState. */
  saveState() {
    return this.emulator.save_state();
  }

  /** Restore a state from saveState (or a zstd-compressed one). */
  async restoreState(state) {
    await this.emulator.restore_state(state);
  }

  pause() {
    return this.emulator.stop();
  }

  resume() {
    return this.emulator.run();
  }

  reset() {
    this.emulator.restart();
  }

  destroy() {
    if (this._ctl) this._ctl.close();
    if (this.emulator) this.emulator.destroy();
  }

  /** Serve the /ctl debug console of `kiln serve`: it drives this VM remotely. */
  _connectCtl(url) {
    let ws;
    try {
      ws = new WebSocket(url + (url.includes("?") ? "&" : "?") + "role=vm");
    } catch {
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ctl = ws;
    ws.addEventListener("open", () => ws.send(JSON.stringify({ ev: "hello", serial: this._serial, mode: this.mode })));
    ws.addEventListener("message", async (m) => {
      let cmd;
      try {
        cmd = JSON.parse(m.data);
      } catch {
        return;
      }
      const reply = (o) => ws.readyState === 1 && ws.send(JSON.stringify(o));
      try {
        switch (cmd.cmd) {
          case "serial":
            this.sendSerial(String(cmd.data));
            break;
          case "pause":
            await this.pause();
            reply({ ev: "paused" });
            break;
          case "resume":
            await this.resume();
            reply({ ev: "resumed" });
            break;
          case "reset":
            this.reset();
            reply({ ev: "reset" });
            break;
          case "save": {
            const s = await this.saveState();
            reply({ ev: "state", bytes: s.byteLength });
            ws.send(s);
            break;
          }
          default:
            reply({ ev: "error", message: `unknown command ${JSON.stringify(cmd.cmd)}` });
        }
      } catch (e) {
        reply({ ev: "error", message: String(e) });
      }
    });
    ws.addEventListener("error", () => {});
  }
}
