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
 *
 * The handle: ready (Promise of the handle), mode ("cold" | "warm"), emulator (the V86 object),
 * serialText(), sendSerial(text), onSerial(fn), terminalText(), saveState(), restoreState(buf),
 * pause(), resume(), reset(), destroy().
 */

const HERE = new URL(".", import.meta.url);

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

/** Fetch a state manifest and its parts; returns {buffer, serial}. */
async function loadState(manifestUrl) {
  const m = await (await fetchOk(manifestUrl)).json();
  const parts = await Promise.all(
    m.parts.map(async (p) => new Uint8Array(await (await fetchOk(new URL(p.url, manifestUrl))).arrayBuffer())),
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
    const warmP = cfg.state && this.options.warm !== false ? loadState(u(cfg.state)).catch((e) => {
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
    opts[cfg.disk.kind] = { url: u(cfg.disk.url), size: cfg.disk.size, async: false };
    if (state) {
      // The state holds the BIOS in guest memory: a warm page never fetches or runs firmware.
      opts.initial_state = { buffer: state.buffer };
      this.mode = "warm";
    } else {
      opts.bios = { url: u(cfg.bios) };
      opts.vga_bios = { url: u(cfg.vga_bios) };
      this.mode = "cold";
    }
    if (cfg.net) opts.net_device = { type: "ne2k", relay_url: wsUrl(cfg.net, configUrl) };

    const emu = new globalThis.V86(opts);
    this.emulator = emu;
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
    if (this.terminal) this.terminal.write(text);
    for (const fn of this._listeners) fn(text);
    if (this._ctl && this._ctl.readyState === 1) this._ctl.send(JSON.stringify({ ev: "serial", data: text }));
  }

  /** All text the guest has written to COM1 so far (with a warm start: since the original boot). */
  serialText() {
    return this._serial;
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
