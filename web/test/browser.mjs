// kiln's browser test: real headless Chromium against sites made by `kiln prepare` and a running
// `kiln serve`. Run by crates/kiln-web/tests/browser.rs (cargo test), or by hand:
//   node web/test/browser.mjs --site DIR [--warm-site DIR] [--serve URL --console WS-URL --save-path FILE]
// The boot image must print "ClientAPI\r\n" and answer each serial line reversed.
// Prints one line per check and "N passed, 0 failed"; exits non-zero on the first failure.
import fs from "node:fs";
import { staticServer, launchChromium, waitIn } from "./lib.mjs";

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, "")] = process.argv[i + 1];
if (!args.site) {
  console.error("usage: browser.mjs --site DIR [--warm-site DIR] [--serve URL --console WS-URL --save-path FILE]");
  process.exit(2);
}

let passed = 0;
const ok = (what) => {
  passed++;
  console.log(`ok ${passed} - ${what}`);
};
const t0 = Date.now();
const SUB = "/a/b/demo/";
const WARM = "/warm/site/";
const mounts = { [SUB]: args.site };
if (args["warm-site"]) mounts[WARM] = args["warm-site"];
const { server, base } = await staticServer(mounts);
const browser = await launchChromium();
const errors = [];

async function openPage(url) {
  const page = await browser.ctx.newPage();
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  page.on("pageerror", (e) => errors.push(`${url}: ${e.message}`));
  const start = Date.now();
  await page.goto(url);
  return { page, requests, start };
}

const hasSerial = (s) => window.vm && window.vm.serialText().includes(s);

try {
  // 1. Cold boot under a sub-path from a plain static server.
  const url = base + SUB;
  const a = await openPage(url);
  await waitIn(a.page, hasSerial, "ClientAPI", "the banner on serial");
  ok(`banner on serial under ${SUB} after ${Date.now() - a.start} ms (cold)`);
  // blob: URLs are v86's own in-page workers; everything fetched must come from under SUB.
  const outside = a.requests.filter((r) => !r.startsWith(url) && !r.startsWith("blob:"));
  if (outside.length) throw new Error(`requests outside ${SUB}: ${outside}`);
  ok("every request stayed under the sub-path");
  await waitIn(a.page, () => window.vm.terminalText().includes("ClientAPI"), null, "the banner in the xterm.js terminal");
  ok("banner in the terminal");
  await waitIn(a.page, () => window.vm.screenText().includes("ClientAPI"), null, "the banner on the VGA screen");
  ok("banner on the VM screen");
  await a.page.evaluate(() => window.vm.sendSerial("hello\r"));
  await waitIn(a.page, hasSerial, "olleh\r\n", "olleh after sendSerial('hello\\r')");
  ok("sendSerial('hello\\r') answered with olleh");
  await a.page.click(".kiln-terminal .xterm");
  await a.page.keyboard.type("kiln");
  await a.page.keyboard.press("Enter");
  await waitIn(a.page, hasSerial, "nlik\r\n", "nlik after typing kiln<Enter> in the terminal");
  await waitIn(a.page, () => window.vm.terminalText().includes("nlik"), null, "nlik in the terminal");
  ok("typing into the terminal is answered");

  // 2. Save (a half-typed line is part of the state), restore into a fresh page.
  await a.page.evaluate(() => window.vm.sendSerial("xyz"));
  await a.page.waitForTimeout(100);
  await a.page.click("#save");
  await waitIn(a.page, () => document.getElementById("status").textContent.startsWith("saved"), null, "status 'saved'");
  await a.page.close();
  const b = await openPage(url);
  await waitIn(b.page, hasSerial, "ClientAPI", "the banner in the fresh page");
  await b.page.click("#restore");
  await waitIn(b.page, () => document.getElementById("status").textContent === "restored", null, "status 'restored'");
  await b.page.evaluate(() => window.vm.sendSerial("123\r"));
  await waitIn(b.page, hasSerial, "321zyx\r\n", "321zyx (the saved half line 'xyz' + '123')");
  ok("save, restore into a fresh page: the REPL continues the saved line (321zyx)");
  const s = await b.page.evaluate(async () => {
    const st = await window.vm.saveState();
    window.vm.sendSerial("q");
    await new Promise((r) => setTimeout(r, 50));
    await window.vm.restoreState(st);
    window.vm.sendSerial("w\r");
    return st.byteLength;
  });
  await waitIn(b.page, hasSerial, "\r\nw\r\n", "w alone (the API restore dropped the typed q)");
  ok(`saveState()/restoreState() API round trip (${s} bytes)`);
  await b.page.close();

  // 3. Warm: resumes from the shipped state without any firmware.
  if (args["warm-site"]) {
    const dir = args["warm-site"];
    const m = JSON.parse(fs.readFileSync(`${dir}/state/manifest.json`, "utf8"));
    let total = 0;
    for (const p of m.parts) {
      const n = fs.statSync(`${dir}/state/${p.url}`).size;
      if (n !== p.size) throw new Error(`state part ${p.url} is ${n} bytes, manifest says ${p.size}`);
      total += n;
    }
    if (total !== m.size || m.parts.length === 0) throw new Error(`state parts add up to ${total}, manifest says ${m.size}`);
    ok(`warm state: ${m.parts.length} part(s), ${total} bytes as the manifest says`);
    const w = await openPage(base + WARM);
    await waitIn(w.page, hasSerial, "ClientAPI", "the banner (warm)");
    const warmMs = Date.now() - w.start;
    const mode = await w.page.evaluate(() => window.vm.mode);
    if (mode !== "warm") throw new Error(`page booted ${mode}, expected warm`);
    await w.page.evaluate(() => window.vm.sendSerial("hello\r"));
    await waitIn(w.page, hasSerial, "olleh\r\n", "olleh (warm)");
    const bios = w.requests.filter((r) => r.includes("/bios/"));
    if (bios.length) throw new Error(`warm page fetched firmware: ${bios}`);
    ok(`warm page answers the REPL without a BIOS boot (banner after ${warmMs} ms, no firmware fetched)`);
    await w.page.close();
  }

  // 4. kiln serve: the page at the root, /ctl console, /net relay.
  if (args.serve) {
    const root = args.serve.endsWith("/") ? args.serve : args.serve + "/";
    const p = await openPage(root);
    await waitIn(p.page, hasSerial, "ClientAPI", "the banner at kiln serve's root");
    await p.page.evaluate(() => window.vm.sendSerial("hello\r"));
    await waitIn(p.page, hasSerial, "olleh\r\n", "olleh at kiln serve's root");
    ok("kiln serve: the page boots and answers at the root");
    // The page got its VM key from kiln.json; the console needs the key kiln serve printed.
    const cfg = await (await fetch(root + "kiln.json")).json();
    if (!/^ctl\?key=[0-9a-f]{64}$/.test(cfg.ctl) || !/^net\?key=[0-9a-f]{64}$/.test(cfg.net))
      throw new Error(`kiln.json from kiln serve has no keyed ctl/net URLs: ${cfg.ctl} ${cfg.net}`);
    const consoleUrl = args.console;
    if (!consoleUrl) throw new Error("--serve needs --console WS-URL (with its key)");
    const unkeyed = await new Promise((res) => {
      const s = new WebSocket(root.replace(/^http/, "ws") + "ctl");
      s.onopen = () => res(false);
      s.onerror = () => res(true);
    });
    if (!unkeyed) throw new Error("/ctl accepted a console without its key");
    ok("/ctl refuses a console without the key");
    const ws = new WebSocket(consoleUrl);
    let got = "";
    const events = [];
    ws.onmessage = (m) => {
      const e = JSON.parse(m.data);
      events.push(e);
      if (e.ev === "serial") got += e.data;
    };
    await new Promise((res, rej) => {
      ws.onopen = res;
      ws.onerror = () => rej(new Error("cannot connect to /ctl"));
    });
    const until = async (cond, what, ms = 10000) => {
      const end = Date.now() + ms;
      while (!cond()) {
        if (Date.now() > end) throw new Error(`/ctl: timed out waiting for ${what}; events: ${JSON.stringify(events).slice(-400)}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    await until(() => got.includes("ClientAPI"), "the serial backlog with the banner");
    ws.send(JSON.stringify({ cmd: "serial", data: "console\r" }));
    await until(() => got.includes("elosnoc\r\n"), "elosnoc");
    ok("/ctl: serial backlog, send serial, read the reversed line");
    ws.send(JSON.stringify({ cmd: "pause" }));
    await until(() => events.some((e) => e.ev === "paused"), "paused");
    ws.send(JSON.stringify({ cmd: "resume" }));
    await until(() => events.some((e) => e.ev === "resumed"), "resumed");
    ws.send(JSON.stringify({ cmd: "save" }));
    await until(() => events.some((e) => e.ev === "saved" || e.ev === "error"), "saved");
    const saved = events.find((e) => e.ev === "saved");
    if (!saved) throw new Error(`/ctl save failed: ${JSON.stringify(events.find((e) => e.ev === "error"))}`);
    if (args["save-path"] && fs.statSync(args["save-path"]).size !== saved.bytes)
      throw new Error(`saved state ${args["save-path"]} does not have ${saved.bytes} bytes`);
    ok(`/ctl: pause, resume, save (${saved.bytes} bytes to ${saved.path})`);
    ws.send(JSON.stringify({ cmd: "reset" }));
    await until(() => events.some((e) => e.ev === "reset"), "reset");
    await until(() => got.split("ClientAPI").length >= 3, "the banner again after reset");
    ok("/ctl: reset reboots the VM (banner again)");
    ws.close();
    await p.page.close();

    // A cross-origin page must not get the console, even with the key.
    const evil = await staticServer({ "/": args.site });
    const e = await openPage(evil.base + "/");
    const refused = await e.page.evaluate(
      (u) =>
        new Promise((res) => {
          const s = new WebSocket(u);
          s.onopen = () => res(false);
          s.onerror = () => res(true);
        }),
      consoleUrl,
    );
    if (!refused) throw new Error("/ctl accepted a WebSocket from another origin");
    ok("/ctl refuses other origins");
    await e.page.close();
    evil.server.close();

    const offer = await dhcp(new URL(cfg.net, root).href.replace(/^http/, "ws"));
    ok(`/net: DHCP DISCOVER answered with an OFFER of ${offer}`);
  }
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  console.log(`browser tests took ${Date.now() - t0} ms`);
  console.log(`${passed} passed, 0 failed`);
} catch (e) {
  console.log(`not ok - ${e.message}`);
  console.log(`${passed} passed, 1 failed`);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}

/** Send a DHCP DISCOVER through the relay; resolve to the offered address. */
async function dhcp(url) {
  const mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
  const bootp = new Uint8Array(240 + 4);
  bootp.set([1, 1, 6, 0]); // BOOTREQUEST, Ethernet, hlen 6
  bootp.set([0xde, 0xad, 0xbe, 0xef], 4); // xid
  bootp.set([0x80, 0x00], 10); // broadcast flag
  bootp.set(mac, 28);
  bootp.set([99, 130, 83, 99], 236); // magic cookie
  bootp.set([53, 1, 1, 255], 240); // DHCPDISCOVER, end
  const udp = new Uint8Array(8 + bootp.length);
  const dv = new DataView(udp.buffer);
  dv.setUint16(0, 68);
  dv.setUint16(2, 67);
  dv.setUint16(4, udp.length);
  udp.set(bootp, 8);
  const ip = new Uint8Array(20 + udp.length);
  const iv = new DataView(ip.buffer);
  ip.set([0x45, 0]);
  iv.setUint16(2, ip.length);
  ip.set([0, 0, 0, 0, 64, 17], 4); // id, flags, ttl 64, UDP
  ip.set([0, 0, 0, 0, 255, 255, 255, 255], 12);
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += iv.getUint16(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  iv.setUint16(10, ~sum & 0xffff);
  ip.set(udp, 20);
  const frame = new Uint8Array(14 + ip.length);
  frame.set([255, 255, 255, 255, 255, 255, ...mac, 0x08, 0x00]);
  frame.set(ip, 14);

  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.close();
      reject(new Error("/net: no DHCP OFFER within 10 s"));
    }, 10000);
    ws.onopen = () => ws.send(frame);
    ws.onerror = () => reject(new Error("/net: WebSocket error"));
    ws.onclose = (e) => reject(new Error(`/net closed: ${e.code} ${e.reason}`));
    ws.onmessage = (m) => {
      const f = new Uint8Array(m.data);
      // Ethernet/IPv4/UDP from port 67 with our xid and DHCP message type 2 (OFFER).
      if (f.length < 14 + 20 + 8 + 244 || f[12] !== 8 || f[13] !== 0 || f[23] !== 17) return;
      const ihl = (f[14] & 15) * 4;
      const u = 14 + ihl;
      if (((f[u] << 8) | f[u + 1]) !== 67) return;
      const d = u + 8;
      if (f[d + 4] !== 0xde || f[d + 5] !== 0xad) return;
      for (let o = d + 240; o < f.length && f[o] !== 255; o += f[o] === 0 ? 1 : 2 + f[o + 1]) {
        if (f[o] === 53 && f[o + 2] === 2) {
          clearTimeout(timer);
          ws.onclose = null;
          ws.close();
          resolve(Array.from(f.slice(d + 16, d + 20)).join("."));
          return;
        }
      }
    };
  });
}
