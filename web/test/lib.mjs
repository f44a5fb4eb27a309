// Shared helpers for kiln's browser tests and benchmark: a plain static file server that mounts
// sites under sub-paths, and headless Debian Chromium through playwright-core.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
};

/** A plain static server: `mounts` maps URL prefixes ("/a/b/demo/") to directories. */
export function staticServer(mounts) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    let p = decodeURIComponent(url.pathname);
    for (const [prefix, dir] of Object.entries(mounts)) {
      if (!p.startsWith(prefix)) continue;
      let rel = p.slice(prefix.length);
      if (rel === "" || rel.endsWith("/")) rel += "index.html";
      const file = path.join(dir, rel);
      if (!file.startsWith(path.resolve(dir) + path.sep)) break;
      fs.readFile(file, (err, data) => {
        if (err) {
          res.writeHead(404).end("not found\n");
          return;
        }
        // no-store: every navigation (and benchmark run) fetches the site afresh.
        res.writeHead(200, {
          "content-type": TYPES[path.extname(file)] || "application/octet-stream",
          "cache-control": "no-store",
        });
        res.end(data);
      });
      return;
    }
    res.writeHead(404).end("not found\n");
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ server, base: `http://127.0.0.1:${server.address().port}` })),
  );
}

/** Headless Debian Chromium with a fresh profile. */
export async function launchChromium() {
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch {
    throw new Error("playwright-core is not installed: run `npm ci` in kiln's web/ directory (scripts/setup does it)");
  }
  const exe = process.env.KILN_CHROMIUM || "/usr/bin/chromium";
  if (!fs.existsSync(exe)) throw new Error(`${exe} not found: install Debian's chromium package`);
  const userDataDir = fs.mkdtempSync(path.join(process.env.TMPDIR || "/tmp", "kiln-chromium-"));
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: exe,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  return {
    ctx,
    async close() {
      await ctx.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Poll `fn` in the page until it returns truthy; fail with `what` after `ms`. */
export async function waitIn(page, fn, arg, what, ms = 20000) {
  try {
    await page.waitForFunction(fn, arg, { timeout: ms, polling: 10 });
  } catch (e) {
    const serial = await page.evaluate(() => (window.vm ? window.vm.serialText() : "(no window.vm)")).catch(() => "?");
    throw new Error(`timed out after ${ms} ms waiting for ${what}; serial so far: ${JSON.stringify(serial)}`);
  }
}
