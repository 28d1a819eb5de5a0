// The web chat page in headless Chromium: type a prompt, watch the reply
// stream in, save a screenshot. Usage: node web_page.cjs URL OUT.png PROMPT
// (NODE_PATH must reach playwright-core; CHROMIUM may name the browser).
// Prints one JSON object with what it saw.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

(async () => {
  const [url, out, prompt] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "smoe-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1000, height: 620 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    await page.waitForFunction(() => document.getElementById("model").textContent.includes("context"));
    await page.click("summary");
    await page.fill("#max", "48");
    await page.fill("#temp", "0");
    await page.click("summary");
    await page.fill("#prompt", prompt);
    await page.press("#prompt", "Enter");
    // The first text, while the reply is still streaming (no usage line yet).
    await page.waitForFunction(() => {
      const c = document.querySelector(".assistant .content");
      return c && c.textContent.length > 0;
    });
    const early = await page.evaluate(() => ({
      text: document.querySelector(".assistant .content").textContent,
      meta: document.querySelector(".assistant .meta").textContent,
    }));
    await page.waitForFunction(() => document.querySelector(".assistant .meta").textContent.length > 0,
      null, { timeout: 60000 });
    // One more /health poll, so the stats show this reply.
    await page.waitForTimeout(1200);
    const done = await page.evaluate(() => ({
      text: document.querySelector(".assistant .content").textContent,
      meta: document.querySelector(".assistant .meta").textContent,
      user: document.querySelector(".user").textContent,
      toks: document.getElementById("toks").textContent,
      ntok: document.getElementById("ntok").textContent,
      hit: document.getElementById("hit").textContent,
    }));
    await page.screenshot({ path: out });
    console.log(JSON.stringify({ early, done, errors }));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
