// The browser proof for Linux images (driven by crates/kiln/tests/web_linux.rs; reused by
// bench/web.mjs): in headless Debian Chromium,
//   --site DIR       a prepared Linux site with a saved state, served under a sub-path by a
//                    plain static server: it resumes at the root prompt and answers
//                    `cat /etc/os-release`; never fetching the kernel, initrd or 9p index.
//   --serve URL      `kiln serve IMAGE` of the same image: right after the restore the guest
//                    gets a DHCP lease through /net and fetches a page from an HTTP server on
//                    this machine's loopback (10.0.2.2 in the guest);
//   --forward H:G    with --serve: `kiln serve -p H:G` reaches a listener on the guest's port G.
// Prints one JSON line of measurements; exits non-zero with a message on a failure.
import http from "node:http";
import net from "node:net";
import { staticServer, launchChromium } from "./lib.mjs";

const args = process.argv.slice(2);
const arg = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const siteDir = arg("--site");
const serveUrl = arg("--serve");
const forward = arg("--forward");
const timeout = Number(arg("--timeout") || 120000);

const fail = (msg) => {
  console.error(`linux.mjs: ${msg}`);
  process.exit(1);
};
const check = (cond, msg) => cond || fail(msg);

/** Opens `url`, waits for the VM; returns {page, ready_ms}. */
async function open(ctx, url) {
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.vm, null, { timeout });
  await page.evaluate(() => window.vm.ready.then(() => null));
  return { page, t0, ready_ms: Date.now() - t0 };
}

const run = (page, cmd, t = timeout) =>
  page.evaluate(([c, t]) => window.vm.run(c, { timeout: t }), [cmd, t]);

const results = {};
const browser = await launchChromium();
try {
  if (siteDir) {
    const { server, base } = await staticServer({ "/a/b/linux/": siteDir });
    try {
      const { page, t0, ready_ms } = await open(browser.ctx, `${base}/a/b/linux/`);
      results.site_ready_ms = ready_ms;
      check((await page.evaluate(() => window.vm.mode)) === "warm", "the site did not resume from its state");
      const out = await run(page, "cat /etc/os-release");
      results.site_first_answer_ms = Date.now() - t0;
      check(out.includes("VERSION_CODENAME=bookworm"), `cat /etc/os-release printed ${JSON.stringify(out)}`);
      const fetched = await page.evaluate(() =>
        performance.getEntriesByType("resource").map((e) => [new URL(e.name).pathname, e.transferSize]),
      );
      results.site_bytes = fetched.reduce((n, [, s]) => n + s, 0);
      results.site_files = fetched.length;
      for (const never of ["/fs.json", "/boot/vmlinuz", "/boot/initrd.img", "/bios/seabios.bin"]) {
        check(!fetched.some(([p]) => p.endsWith(never)), `a warm start fetched ${never}`);
      }
      check(fetched.some(([p]) => p.includes("/fs/")), "no 9p file was fetched lazily");
      // The page's progress bar followed the state's download to its end.
      const bar = await page.evaluate(() => {
        const p = document.getElementById("progress");
        return { value: p.value, hidden: p.hidden };
      });
      check(bar.value === 1 && bar.hidden, `the progress bar ended at ${JSON.stringify(bar)}`);
      await page.close();
    } finally {
      server.close();
    }
  }
  if (serveUrl) {
    const host = http.createServer((req, res) => res.end("kiln-host-page\n"));
    await new Promise((r) => host.listen(0, "127.0.0.1", r));
    const port = host.address().port;
    try {
      const { page, t0 } = await open(browser.ctx, serveUrl);
      check((await page.evaluate(() => window.vm.mode)) === "warm", "kiln serve's page did not resume");
      const lease = await run(
        page,
        'for i in $(seq 120); do ip -4 addr show eth0 | grep -q "inet " && break; sleep 0.5; done; ip -4 -br addr show eth0',
      );
      results.serve_lease_ms = Date.now() - t0;
      check(lease.includes("10.0.2.15"), `no DHCP lease after the restore: ${JSON.stringify(lease)}`);
      const got = await run(page, `busybox wget -q -O - http://10.0.2.2:${port}/`);
      check(got.includes("kiln-host-page"), `the guest's fetch through /net printed ${JSON.stringify(got)}`);
      if (forward) {
        const [hostPort, guestPort] = forward.split(":").map(Number);
        // Where serial stands before the command: nc may end, and NCDONE appear, before the
        // wait below starts (its default is output from the call on).
        const from = await page.evaluate(
          (p) => {
            const at = window.vm.serialText().length;
            window.vm.sendSerial(`echo from-guest | busybox nc -l -p ${p}; echo NC""DONE\n`);
            return at;
          },
          guestPort,
        );
        await new Promise((r) => setTimeout(r, 3000));
        const reply = await new Promise((resolve, reject) => {
          const s = net.connect(hostPort, "127.0.0.1");
          let data = "";
          const timer = setTimeout(() => reject(new Error(`no answer through -p ${forward}`)), 30000);
          // bookworm's passt completes the guest's handshake once the client sends.
          s.on("connect", () => s.write("hi\n"));
          s.on("data", (d) => {
            data += d;
            if (data.includes("from-guest")) {
              clearTimeout(timer);
              s.destroy();
              resolve(data);
            }
          });
          s.on("error", reject);
        }).catch((e) => fail(e.message));
        check(reply.includes("from-guest"), "the forward did not reach the guest");
        await page.evaluate((from) => window.vm.waitFor("NCDONE", { timeout: 30000, from }), from);
        results.forward = forward;
      }
      await page.close();
    } finally {
      host.close();
    }
  }
} catch (e) {
  fail(e.message);
} finally {
  await browser.close();
}
console.log(JSON.stringify(results));
