// The web page of `sdfix serve` in a real headless browser (Debian's chromium), run by hand (CI
// has no browser; tests/serve.rs checks the page's contents and routes without one):
//
//   cargo build --release
//   apt-get install -y chromium
//   mkdir -p .venv-browser && cd .venv-browser && echo '{"private":true}' > package.json \
//     && npm install playwright-core && cd ..
//   NODE_PATH=.venv-browser/node_modules node scripts/page_check.mjs [target/release/sdfix]
//
// Starts `sdfix serve --model demo` on a free loopback port and, in the page:
// - types a long prompt and sees the token counter count past one chunk (N/150);
// - generates 150 steps and sees the live preview (`current_image` of /sdapi/v1/progress) before
//   the final picture, the progress bar move, the infotext under the picture; a second picture
//   goes into the history, and clicking the first loads its settings back; the history is still
//   there in a new tab (IndexedDB), and "clear" empties it for good;
// - drops a PNG the server made, then two crafted AUTOMATIC1111 PNGs (a `parameters` tEXt chunk,
//   and a UTF-8 iTXt one with a hires fix and its own sampler and prompts), and sees their
//   prompts and fields loaded, and
//   /sdapi/v1/png-info read the first A1111 one alike;
// - generates with those hires fields: the request carries them, the picture is 1.5x and its
//   infotext has the second pass's sampler and prompt;
// - loads a grey picture for img2img, paints the left part of the mask on the canvas, inpaints,
//   and checks the request (init_images, mask, denoising_strength) and the picture that came
//   back: repainted on the left, kept on the right;
// - "Compare fixes" on demo (four columns) and demo-flawed (three and a note).
// Screenshots: docs/serve-page.png, docs/serve-page-preview.png, docs/serve-page-inpaint.png,
// docs/serve-page-compare.png.
// Exits 1 on failure.

import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deflateSync } from "node:zlib";

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

// ---- Crafted PNGs (as PIL writes A1111's: RGB, 8 bits, text chunks before the image) ---------

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0);
  return Buffer.concat([head, data, crc]);
}
// A width x height RGB PNG of colour(x, y) with text chunks [type, keyword, text]: tEXt in
// Latin-1, iTXt uncompressed UTF-8.
function makePng(width, height, colour, texts = []) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const rows = [];
  for (let y = 0; y < height; y++) {
    const row = [0];
    for (let x = 0; x < width; x++) row.push(...colour(x, y));
    rows.push(Buffer.from(row));
  }
  const textChunks = texts.map(([type, keyword, text]) => type === "tEXt"
    ? chunk("tEXt", Buffer.concat([Buffer.from(keyword, "latin1"), Buffer.from([0]), Buffer.from(text, "latin1")]))
    : chunk("iTXt", Buffer.concat([Buffer.from(keyword, "latin1"), Buffer.from([0, 0, 0, 0, 0]),
      Buffer.from(text, "utf8")])));
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr), ...textChunks,
    chunk("IDAT", deflateSync(Buffer.concat(rows))), chunk("IEND", Buffer.alloc(0))]);
}

// ---- The run ---------------------------------------------------------------------------------

const { server, address } = await startServer();
// The server goes when this script does, whatever happens.
process.on("exit", () => server.kill());
const base = `http://${address}`;
const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "sdfix-chromium-")), {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1100, height: 820 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  // Every address the page asks for must be this server's (offline, no CDN).
  const elsewhere = [];
  page.on("request", (r) => { if (!r.url().startsWith(base) && !r.url().startsWith("data:")) elsewhere.push(r.url()); });
  let previewsSent = 0;
  page.on("response", async (r) => {
    if (!r.url().includes("/sdapi/v1/progress")) return;
    const p = await r.json().catch(() => ({}));
    if (p.current_image) previewsSent++;
  });
  await page.goto(`${base}/`);
  await page.waitForFunction(() => document.querySelectorAll("#sampler option").length > 0);
  const samplers = await page.$$eval("#sampler option", (o) => o.map((x) => x.value));
  check("page loads the samplers and models", samplers.includes("DDIM"), samplers.join(", "));

  // The token counter, as the user types: one chunk, then past 75 tokens.
  await page.waitForFunction(() => /\/75$/.test(document.getElementById("prompt-count").textContent));
  const short = await page.$eval("#prompt-count", (e) => e.textContent);
  check("the token counter shows the prompt's count", short === "3/75", short);
  await page.fill("#prompt", "");
  await page.type("#prompt", "solid black background, " + "a tall (lighthouse:1.2) on a rock, ".repeat(14), { delay: 1 });
  await page.waitForFunction(() => /\/150/.test(document.getElementById("prompt-count").textContent), null,
    { timeout: 10000 }).catch(() => {});
  const long = await page.$eval("#prompt-count", (e) => e.textContent);
  const counted = /^(\d+)\/150 \(2 chunks: (\d+) \+ (\d+)\)$/.exec(long);
  check("a long prompt counts past one chunk, per chunk", counted && Number(counted[1]) > 75, long);

  // Generate: the live preview before the final picture.
  await page.fill("#prompt", "solid black background");
  await page.fill("#steps", "150");
  await page.fill("#seed", "3");
  await page.evaluate(() => {
    window.seen = { preview: 0, final: 0, bar: false };
    const started = performance.now();
    const timer = setInterval(() => {
      const live = document.getElementById("live");
      if (live && live.src.startsWith("data:image/png") && !window.seen.preview) window.seen.preview = performance.now() - started;
      const fill = document.getElementById("fill").style.width;
      if (fill && fill !== "0" && fill !== "0%") window.seen.bar = true;
      if (document.querySelector("#results figure:not(#live-figure) img")) {
        window.seen.final = performance.now() - started;
        clearInterval(timer);
      }
    }, 10);
  });
  await page.click("#generate");
  // The output side while the preview shows (if it does) for the docs.
  const previewShown = await page.waitForFunction(() => document.getElementById("live")?.src.startsWith("data:"),
    null, { timeout: 60000 }).then(() => true, () => false);
  if (previewShown) await (await page.$("#output")).screenshot({ path: "docs/serve-page-preview.png" });
  await page.waitForSelector("#results figure:not(#live-figure) img", { timeout: 120000 });
  const seen = await page.evaluate(() => window.seen);
  check("the progress bar moved", seen.bar);
  check("the live preview showed before the final picture", seen.preview > 0 && seen.preview < seen.final,
    `${previewsSent} previews from the server, first shown at ${seen.preview.toFixed(0)} ms, ` +
    `the picture at ${seen.final.toFixed(0)} ms`);
  const caption = await page.$eval("#results figcaption", (e) => e.textContent);
  check("the picture's parameters are under it", caption.includes("Seed: 3") && caption.includes("Steps: 150"),
    caption.split("\n")[1]);

  // A second picture; the history holds both, and clicking the first loads its settings.
  await page.fill("#steps", "20");
  await page.fill("#seed", "11");
  await page.fill("#prompt", "another prompt");
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll("#history img").length === 2, null, { timeout: 60000 });
  await page.click("#history img:last-child");
  const restored = await page.evaluate(() => ["prompt", "seed", "steps"].map((id) => document.getElementById(id).value));
  check("clicking a history picture loads its settings", restored.join("|") === "solid black background|3|150",
    restored.join(" | "));

  // The history outlives a reload (IndexedDB): a second tab of the page shows both pictures,
  // newest first, and its first entry loads the settings; "clear" empties it for good.
  const again = await context.newPage();
  await again.goto(`${base}/`);
  await again.waitForFunction(() => document.querySelectorAll("#history img").length === 2, null, { timeout: 10000 })
    .catch(() => {});
  const kept = await again.$$eval("#history img", (imgs) => imgs.map((img) => img.title.split("\n")[0]));
  await again.click("#history img:last-child").catch(() => {});
  const reloaded = await again.evaluate(() => ["prompt", "seed", "steps"].map((id) => document.getElementById(id).value));
  check("the history is kept across a reload, and loads its settings",
    kept.length === 2 && kept[0] === "another prompt" && reloaded.join("|") === "solid black background|3|150",
    `${kept.length} pictures (${kept.join(" / ")}); loaded ${reloaded.join(" | ")}`);
  await again.click("#clear-history");
  // The clear is an IndexedDB transaction: reload once it has committed (a user's next click
  // comes later than a script's).
  await again.waitForFunction(() => new Promise((resolve) => {
    const open = indexedDB.open("sdfix", 1);
    open.onsuccess = () => {
      const count = open.result.transaction("history").objectStore("history").count();
      count.onsuccess = () => resolve(count.result === 0);
      count.onerror = () => resolve(false);
    };
    open.onerror = () => resolve(false);
  }), null, { timeout: 5000 }).catch(() => {});
  await again.reload();
  await again.waitForTimeout(500);
  const cleared = await again.$$eval("#history img", (imgs) => imgs.length);
  check("clear empties the kept history", cleared === 0, `${cleared} pictures after clear and reload`);
  await again.close();

  // PNG info: a PNG the server made, dropped on the page.
  const made = await (await fetch(`${base}/sdapi/v1/txt2img`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: "a lighthouse at dusk", negative_prompt: "blurry", seed: 42, steps: 7,
      cfg_scale: 5.5, sampler_name: "Euler a", spacing: "leading" }),
  })).json();
  const drop = async (bytes, name) => {
    const dataTransfer = await page.evaluateHandle(({ bytes, name }) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
      return transfer;
    }, { bytes: [...bytes], name });
    await page.dispatchEvent("#results", "drop", { dataTransfer });
    await page.waitForFunction((name) => document.getElementById("pnginfo").textContent.startsWith(name) ||
      document.getElementById("error").textContent.startsWith(name), name, { timeout: 5000 });
  };
  const form = () => page.evaluate(() => {
    const $ = (id) => document.getElementById(id);
    return Object.fromEntries(
    ["prompt", "negative", "steps", "cfg", "seed", "sampler", "scheduler", "width", "height", "hr_scale",
      "hr_upscaler", "hr_second_pass_steps", "hr_denoising", "hr_sampler_name", "hr_prompt",
      "hr_negative_prompt"].map((id) => [id, $(id).value])
      .concat([["trailing", $("trailing").checked], ["enable_hr", $("enable_hr").checked]]));
  });
  await drop(Buffer.from(made.images[0], "base64"), "sdfix.png");
  let f = await form();
  check("a PNG made by sdfix loads its settings",
    f.prompt === "a lighthouse at dusk" && f.negative === "blurry" && f.seed === "42" && f.steps === "7"
    && f.cfg === "5.5" && f.sampler === "Euler a" && f.trailing === false,
    `${f.prompt} | ${f.negative} | seed ${f.seed} | ${f.steps} steps | cfg ${f.cfg} | ${f.sampler} | trailing ${f.trailing}`);

  // An A1111 PNG: tEXt `parameters`, a two-line prompt, a quoted value with commas, the
  // sampler with its schedule (A1111 before 1.9).
  const a1111 = "masterpiece, (a castle:1.2) on a hill, [fog]\nsecond line of the prompt\n" +
    "Negative prompt: lowres, bad anatomy\n" +
    'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567, Size: 64x48, Model hash: 6ce0161689, ' +
    'Model: v1-5-pruned-emaonly, Lora hashes: "detail: 1a2b, style: 3c4d", Version: v1.6.0';
  const a1111Png = makePng(8, 8, () => [90, 120, 200], [["tEXt", "parameters", a1111]]);
  await drop(a1111Png, "a1111.png");
  f = await form();
  check("an A1111 PNG (tEXt parameters) loads its prompt and fields",
    f.prompt === "masterpiece, (a castle:1.2) on a hill, [fog]\nsecond line of the prompt"
    && f.negative === "lowres, bad anatomy" && f.steps === "28" && f.cfg === "6.5" && f.seed === "1234567"
    && f.sampler === "DPM++ 2M" && f.scheduler === "Karras" && f.width === "64" && f.height === "48",
    `${JSON.stringify(f.prompt)} | ${f.negative} | ${f.steps} | ${f.cfg} | ${f.seed} | ${f.sampler} ${f.scheduler} | ${f.width}x${f.height}`);

  // The server's A1111 route reads the same PNG the same way.
  const info = await (await fetch(`${base}/sdapi/v1/png-info`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image: a1111Png.toString("base64") }),
  })).json();
  const p = info.parameters || {};
  check("/sdapi/v1/png-info agrees with the page", p.Prompt === f.prompt && p["Negative prompt"] === f.negative
    && p.Seed === f.seed && p["Size-1"] === f.width && p["Lora hashes"] === "detail: 1a2b, style: 3c4d",
    `Lora hashes: ${p["Lora hashes"]}`);

  // A UTF-8 prompt (PIL writes iTXt then) with A1111's hires fix fields.
  const hires = "café au lait, ☕ on a table\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, " +
    "Seed: 5, Size: 32x32, Model: demo, Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 10, " +
    "Hires upscaler: Latent (nearest), Hires sampler: DDIM, Hires prompt: \"bright, white\", " +
    "Hires negative prompt: dark, Version: v1.10.1";
  await drop(makePng(8, 8, () => [0, 0, 0], [["iTXt", "parameters", hires]]), "a1111-hires.png");
  f = await form();
  check("an A1111 PNG (UTF-8 iTXt, hires fix) loads its prompt and the hires fields",
    f.prompt === "café au lait, ☕ on a table" && f.negative === "" && f.enable_hr && f.hr_scale === "1.5"
    && f.hr_second_pass_steps === "10" && f.hr_upscaler === "Latent (nearest)" && f.hr_denoising === "0.55"
    && f.hr_sampler_name === "DDIM" && f.hr_prompt === "bright, white" && f.hr_negative_prompt === "dark",
    `${f.prompt} | hires ${f.enable_hr} x${f.hr_scale}, ${f.hr_second_pass_steps} steps, ${f.hr_upscaler}, ` +
    `${f.hr_denoising}, ${f.hr_sampler_name}, "${f.hr_prompt}" / "${f.hr_negative_prompt}"`);
  await drop(Buffer.from("not a png at all"), "notes.txt");
  const dropError = await page.$eval("#error", (e) => e.textContent);
  check("a file that is not a PNG is an error, not a change", dropError.includes("not a PNG"), dropError);

  // The hires fix from the form (these fields came from the dropped PNG): a larger picture, or
  // a note where the server has no hires fix yet.
  await page.fill("#prompt", "solid black background");
  await page.fill("#steps", "8");
  const hiresRequest = page.waitForRequest((r) => r.url().endsWith("/sdapi/v1/txt2img"));
  await page.click("#generate");
  const hiresBody = JSON.parse((await hiresRequest).postData());
  await page.waitForSelector("#results figure:not(#live-figure) img", { timeout: 120000 });
  await page.waitForFunction(() => document.querySelector("#results figure img").naturalWidth > 0);
  const hiresWidth = await page.$eval("#results figure img", (i) => i.naturalWidth);
  const hiresNote = await page.$eval("#hires-note", (e) => e.textContent);
  const hiresCaption = await page.$eval("#results figcaption", (e) => e.textContent);
  check("the hires fix fields are sent and the server takes them",
    hiresBody.enable_hr === true && hiresBody.hr_scale === 1.5 && hiresBody.hr_upscaler === "Latent (nearest)"
    && hiresBody.denoising_strength === 0.55 && hiresBody.hr_sampler_name === "DDIM"
    && hiresBody.hr_prompt === "bright, white" && hiresBody.hr_negative_prompt === "dark"
    && hiresWidth === 48 && hiresCaption.includes('Hires sampler: DDIM, Hires prompt: "bright, white"'),
    `${hiresWidth}x${hiresWidth} from 32x32; ${hiresCaption.split("\n").at(-1)}`);
  await page.uncheck("#enable_hr");
  await page.waitForTimeout(300); // the bar's transition back to 0
  await page.screenshot({ path: "docs/serve-page.png" });

  // img2img and inpainting: a grey picture, the left part painted on the mask.
  await page.click("#img2img summary");
  await page.setInputFiles("#init-file", {
    name: "grey.png", mimeType: "image/png", buffer: makePng(32, 32, () => [128, 128, 128]),
  });
  await page.waitForFunction(() => document.getElementById("mask").width === 32);
  await page.$eval("#brush", (e) => { e.value = "40"; });
  // The canvas in view, so that the mouse reaches all of it.
  await page.$eval("#mask", (e) => e.scrollIntoView({ block: "center" }));
  const box = await (await page.$("#mask")).boundingBox();
  for (let y = 0.05; y < 1; y += 0.1) {
    await page.mouse.move(box.x + 2, box.y + box.height * y);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * y, { steps: 5 });
    await page.mouse.up();
  }
  await page.fill("#steps", "20");
  await page.fill("#seed", "5");
  await page.fill("#strength", "1");
  const inpaintRequest = page.waitForRequest((r) => r.url().endsWith("/sdapi/v1/img2img"));
  const inpaintResponse = page.waitForResponse((r) => r.url().endsWith("/sdapi/v1/img2img"));
  await page.click("#generate");
  const sent = JSON.parse((await inpaintRequest).postData());
  const answer = await inpaintResponse;
  check("inpainting sends A1111's img2img fields",
    sent.init_images?.[0]?.startsWith("data:image/png;base64,") && sent.mask?.startsWith("data:image/png;base64,")
    && sent.denoising_strength === 1 && sent.mask_blur === 4 && sent.inpainting_mask_invert === 0
    && sent.enable_hr === undefined, `status ${answer.status()}`);
  await page.waitForSelector("#results figure:not(#live-figure) img", { timeout: 120000 });
  // The picture that came back: the painted left side repainted black, the right side kept.
  const sides = await page.evaluate(async () => {
    const img = document.querySelector("#results figure img");
    await img.decode();
    const c = document.createElement("canvas");
    [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
    const g = c.getContext("2d");
    g.drawImage(img, 0, 0);
    const mean = (x0, x1) => {
      const d = g.getImageData(x0, 0, x1 - x0, c.height).data;
      let s = 0;
      for (let i = 0; i < d.length; i += 4) s += d[i];
      return s / (d.length / 4);
    };
    return { size: `${c.width}x${c.height}`, left: mean(0, 6), right: mean(24, 32) };
  });
  check("the inpainted picture came back: the painted part repainted, the rest kept",
    answer.status() === 200 && sides.size === "32x32" && sides.left < 60 && sides.right === 128,
    `${sides.size}, left mean ${sides.left.toFixed(1)}, right mean ${sides.right.toFixed(1)}`);
  await page.waitForTimeout(300);
  await page.screenshot({ path: "docs/serve-page-inpaint.png", fullPage: true });
  await page.click("#clear-init");

  // Compare fixes: the paper's four columns on demo.
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.click("#compare");
  await page.waitForFunction(() => document.querySelectorAll("#results figure:not(#live-figure) img").length === 4,
    null, { timeout: 120000 });
  const labels = await page.$$eval("#results figure img", (imgs) => imgs.map((i) => i.alt));
  check("Compare fixes shows the four ablation columns", labels.length === 4, labels.join(" | "));
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.waitForTimeout(300);
  await page.screenshot({ path: "docs/serve-page-compare.png" });

  // An epsilon model (demo-flawed): zero SNR cannot apply, so Compare fixes leaves its column
  // out and says so once (ablate's rule).
  await page.selectOption("#model", "demo-flawed");
  await page.waitForFunction(async () => {
    const options = await (await fetch("/sdapi/v1/options")).json();
    return options.sd_model_checkpoint === "demo-flawed";
  }, null, { timeout: 30000 });
  await page.click("#compare");
  await page.waitForFunction(() => document.querySelectorAll("#results figure:not(#live-figure) img").length === 3,
    null, { timeout: 120000 });
  const flawed = await page.$$eval("#results figure img", (imgs) => imgs.map((i) => i.alt));
  const note = await page.$eval("#note", (e) => e.textContent);
  check("Compare fixes on an epsilon model: three columns and one note", flawed.length === 3
    && !flawed.some((l) => l.includes("zero SNR")) && note.includes("zero"), `${flawed.join(" | ")}; ${note}`);
  check("the page asked nothing of any other address", elsewhere.length === 0, elsewhere.join(", "));
  check("no script errors", errors.length === 0, errors.join("; "));
} finally {
  await context.close();
  server.kill();
}
