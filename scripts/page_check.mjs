// The web page of `sdfix serve` in a real headless browser (Debian's chromium), run by hand:
//
//   cargo build --release
//   apt-get install -y chromium
//   mkdir -p .venv-browser && cd .venv-browser && echo '{"private":true}' > package.json \
//     && npm install playwright-core && cd ..
//   NODE_PATH=.venv-browser/node_modules node scripts/page_check.mjs [target/release/sdfix]
//
// Starts `sdfix serve --model demo` on a free loopback port, loads the page, clicks Generate and
// waits for the image, then clicks "Compare fixes" and waits for the four ablation columns, then
// switches to demo-flawed (epsilon) and checks Compare fixes leaves out zero SNR with a note;
// checks the progress bar moved at least once; keeps docs/serve-page.png. Exits 1 on failure.

import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const binary = process.argv[2] || "target/release/sdfix";

function startServer() {
  const server = spawn(binary, ["serve", "--listen", "127.0.0.1:0", "--model", "demo"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    server.stdout.once("data", (chunk) => {
      const match = /http:\/\/(\S+)/.exec(chunk.toString());
      if (match) resolve({ server, address: match[1] });
      else reject(new Error(`no address in ${chunk}`));
    });
    server.once("exit", (code) => reject(new Error(`sdfix serve exited with ${code}`)));
  });
}

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? ": " + detail : ""}`);
  if (!ok) process.exitCode = 1;
}

const { server, address } = await startServer();
// The server goes when this script does, whatever happens.
process.on("exit", () => server.kill());
const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "sdfix-chromium-")), {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1100, height: 900 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`http://${address}/`);
  await page.waitForFunction(() => document.querySelectorAll("#sampler option").length > 0);
  const samplers = await page.$$eval("#sampler option", (o) => o.map((x) => x.value));
  check("page loads the samplers and models", samplers.includes("DDIM"), samplers.join(", "));

  // Enough steps for the progress bar to be seen at least once.
  await page.fill("#steps", "150");
  await page.fill("#seed", "3");
  let barMoved = false;
  const watch = setInterval(async () => {
    const width = await page.$eval("#fill", (e) => e.style.width).catch(() => "0");
    if (width && width !== "0" && width !== "0%") barMoved = true;
  }, 100);
  await page.click("#generate");
  await page.waitForSelector("#results img", { timeout: 120000 });
  clearInterval(watch);
  const caption = await page.$eval("#results figcaption", (e) => e.textContent);
  check("Generate shows an image with its parameters", caption.includes("Seed: 3"), caption.split("\n").pop());
  check("the progress bar moved", barMoved);

  await page.fill("#steps", "20");
  await page.click("#compare");
  await page.waitForFunction(() => document.querySelectorAll("#results img").length === 4, null, {
    timeout: 120000,
  });
  const labels = await page.$$eval("#results img", (imgs) => imgs.map((i) => i.alt));
  check("Compare fixes shows the four ablation columns", labels.length === 4, labels.join(" | "));
  await page.screenshot({ path: "docs/serve-page.png", fullPage: true });

  // An epsilon model (demo-flawed): zero SNR cannot apply, so Compare fixes leaves its column
  // out and says so once (ablate's rule).
  await page.selectOption("#model", "demo-flawed");
  await page.waitForFunction(async () => {
    const options = await (await fetch("/sdapi/v1/options")).json();
    return options.sd_model_checkpoint === "demo-flawed";
  }, null, { timeout: 30000 });
  await page.click("#compare");
  await page.waitForFunction(() => document.querySelectorAll("#results img").length === 3, null, {
    timeout: 120000,
  });
  const flawed = await page.$$eval("#results img", (imgs) => imgs.map((i) => i.alt));
  const note = await page.$eval("#note", (e) => e.textContent);
  check("Compare fixes on an epsilon model: three columns and one note", flawed.length === 3
    && !flawed.some((l) => l.includes("zero SNR")) && note.includes("zero"), `${flawed.join(" | ")}; ${note}`);
  check("no script errors", errors.length === 0, errors.join("; "));
} finally {
  await context.close();
  server.kill();
}
