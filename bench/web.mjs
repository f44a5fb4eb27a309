// kiln web benchmark: headless Debian Chromium, page navigation → banner on serial, cold and
// warm (median of 5 fresh page loads, no HTTP cache), and the site's size gzip'd.
//   node bench/web.mjs [--kiln PATH_TO_KILN] [--runs 5] [--json]
// Needs `npm ci` in web/ and Debian's chromium; builds boot.img with `kiln build`.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { staticServer, launchChromium, waitIn } = await import(path.join(root, "web/test/lib.mjs"));
const args = { kiln: path.join(root, "target/release/kiln"), runs: "5" };
for (let i = 2; i < process.argv.length; i++) {
  const k = process.argv[i].replace(/^--/, "");
  args[k] = k === "json" ? true : process.argv[++i];
}
if (!fs.existsSync(args.kiln)) {
  console.error(`${args.kiln} not found: build it (cargo build --release -p kiln) or pass --kiln PATH`);
  process.exit(2);
}
const runs = Number(args.runs);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "kiln-web-bench-"));
const run = (...a) => execFileSync(args.kiln, a, { stdio: ["ignore", "pipe", "inherit"] });
run("build", "--out", path.join(tmp, "build"));
const img = path.join(tmp, "build/boot.img");
run("prepare", img, path.join(tmp, "cold"));
run("prepare", img, path.join(tmp, "warm"), "--warm", "ClientAPI");

function gzipSize(dir) {
  let total = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!e.isFile()) continue;
    total += zlib.gzipSync(fs.readFileSync(path.join(e.parentPath ?? e.path, e.name)), { level: 9 }).length;
  }
  return total;
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const { server, base } = await staticServer({ "/cold/": path.join(tmp, "cold"), "/warm/": path.join(tmp, "warm") });
const browser = await launchChromium();
const result = {};
try {
  for (const mode of ["cold", "warm"]) {
    const times = [];
    for (let i = 0; i < runs + 1; i++) {
      const page = await browser.ctx.newPage();
      const t = Date.now();
      await page.goto(`${base}/${mode}/`);
      await waitIn(page, () => window.vm && window.vm.serialText().includes("ClientAPI"), null, `banner (${mode})`);
      const ms = Date.now() - t;
      const m = await page.evaluate(() => window.vm.mode);
      if (m !== mode) throw new Error(`${mode} site booted ${m}`);
      if (i > 0) times.push(ms); // the first load warms Chromium's own caches (wasm compile etc.)
      await page.close();
    }
    result[mode] = { median_ms: median(times), runs_ms: times };
  }
  result.gzip_kib = { cold: +(gzipSize(path.join(tmp, "cold")) / 1024).toFixed(1), warm: +(gzipSize(path.join(tmp, "warm")) / 1024).toFixed(1) };
} finally {
  await browser.close();
  server.close();
  fs.rmSync(tmp, { recursive: true, force: true });
}
if (args.json) {
  console.log(JSON.stringify(result, null, 2));
} else {
  console.log("| measure | kiln | goal |");
  console.log("| --- | --- | --- |");
  console.log(`| navigation → banner, cold (median of ${runs}) | ${result.cold.median_ms} ms | ≤ 1000 ms |`);
  console.log(`| navigation → banner, warm (median of ${runs}) | ${result.warm.median_ms} ms | ≤ 500 ms |`);
  console.log(`| site size gzip'd (cold / warm) | ${result.gzip_kib.cold} / ${result.gzip_kib.warm} KiB | ≤ 700 KiB |`);
  console.log(`runs: cold ${result.cold.runs_ms.join(", ")} ms; warm ${result.warm.runs_ms.join(", ")} ms`);
}
