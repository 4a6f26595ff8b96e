// SPDX-License-Identifier: LGPL-2.1-or-later
// The Cockpit page in a real browser: Debian's chromium, headless, driven
// over the DevTools protocol by playwright-core (from cockpit/node_modules).
//
//   node browser.mjs SCENARIO URL OUTDIR
//
// SCENARIO is "admin" (every view and the actions of the issue, as root) or
// "limited" (an unprivileged user: what is shown, and the refusal).  Any
// JavaScript error on the page or console error fails the run.  Screenshots
// go to OUTDIR; the last line printed is a JSON summary for the test.
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "..", "..", "cockpit", "package.json"));
const { chromium } = require("playwright-core");

const [scenario, url, outdir] = process.argv.slice(2);
const problems = [];
const summary = { scenario, progress: [], screenshots: [] };

function check(cond, what) {
    if (!cond)
        throw new Error("check failed: " + what);
}

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.setDefaultTimeout(30000);
page.on("pageerror", err => problems.push("page error: " + err.message));
page.on("console", msg => {
    if (msg.type() === "error")
        problems.push("console error: " + msg.text());
});

async function shot(name) {
    const file = path.join(outdir, name + ".png");
    await page.screenshot({ path: file, fullPage: true });
    summary.screenshots.push(file);
}

async function tab(name) {
    await page.click(`#tabs [data-tab="${name}"] button`);
    await page.waitForSelector(`[data-view="${name}"]:not([hidden])`);
}

async function submitDialog(values) {
    const dlg = page.locator("[data-dialog]");
    await dlg.waitFor();
    for (const [field, value] of Object.entries(values || {})) {
        const input = dlg.locator(`[name="${field}"]`);
        if (typeof value === "boolean")
            await input.setChecked(value);
        else if (typeof value === "object")
            await input.selectOption(value);
        else if ((await input.evaluate(e => e.tagName)) === "SELECT")
            await input.selectOption(value);
        else
            await input.fill(value);
    }
    await dlg.locator("[data-dialog-submit]").click();
}

const chainCard = name => page.locator(`[data-chain$="/${name}"]`);
const jobRow = page.locator("[data-job]");

async function waitStatus(status, timeout) {
    await page.waitForSelector(`[data-job][data-status="${status}"]`, { timeout: timeout || 30000 });
}

try {
    await page.goto(url);
    await page.waitForSelector("body[data-ready]");
    if (scenario === "idle") {
        // the daemon leaves when idle: the page starts it again and shows the chain as before
        await chainCard("D.qcow2").waitFor();
        await page.waitForSelector("body[data-reconnects]", { timeout: 60000 });
        await page.waitForFunction(() => document.getElementById("service-state").textContent.includes("storage roots"),
                                   null, { timeout: 30000 });
        await chainCard("D.qcow2").locator("[data-map] svg").waitFor();
        summary.layers = await chainCard("D.qcow2").locator("[data-layer]").evaluateAll(els => els.map(e => e.dataset.layer.split("/").pop()));
        summary.reconnects = Number(await page.evaluate(() => document.body.dataset.reconnects));
        // and its actions work on the new daemon
        await chainCard("D.qcow2").locator('[data-action="snapshot"]').click();
        await submitDialog({ overlay: "E.qcow2" });
        await chainCard("E.qcow2").waitFor();
        summary.snapshot = true;
    } else if (scenario === "many") {
        // thousands of images: a page of chains drawn, more on request, the filter finds one
        await page.waitForSelector('[data-action="more-chains"]');
        summary.drawn = await page.locator("[data-chain]").count();
        summary.more = await page.locator('[data-action="more-chains"]').innerText();
        await page.click('[data-action="more-chains"]');
        await page.waitForFunction(n => document.querySelectorAll("[data-chain]").length > n, summary.drawn);
        summary.drawnAfterMore = await page.locator("[data-chain]").count();
        await page.locator('[data-filter="chains"]').pressSequentially("disk-1777");
        await page.waitForFunction(() => document.querySelectorAll("[data-chain]").length === 1);
        summary.filtered = await page.locator("[data-chain]").getAttribute("data-chain");
        summary.focusKept = await page.evaluate(() => document.activeElement && document.activeElement.dataset.filter === "chains");
        await shot("many");
    } else {
    // the seed chain [A] <-- [B] <-- [C] <-- [D], drawn base to active
    await chainCard("D.qcow2").waitFor();
    const layers = await chainCard("D.qcow2").locator("[data-layer]").evaluateAll(els => els.map(e => e.dataset.layer.split("/").pop()));
    check(JSON.stringify(layers) === JSON.stringify(["A.qcow2", "B.qcow2", "C.qcow2", "D.qcow2"]), "layers " + layers);
    summary.layers = layers;

    if (scenario === "limited") {
        // what an unprivileged user sees: the chain; the map and the snapshot are refused, and said so
        await page.waitForSelector('[data-chain$="/D.qcow2"] [data-map] .pf-v5-c-alert, [data-chain$="/D.qcow2"] [data-map] svg');
        summary.mapRefused = await chainCard("D.qcow2").locator("[data-map] .pf-v5-c-alert").count() > 0;
        await chainCard("D.qcow2").locator('[data-action="snapshot"]').click();
        await submitDialog({ overlay: "E.qcow2" });
        const err = page.locator('[data-dialog] [data-error="dialog"]');
        await err.waitFor();
        summary.refusal = await err.innerText();
        await shot("limited-refused");
        await page.keyboard.press("Escape");
    } else {
        // the allocation map, by depth: each layer's data where the seed wrote it
        await chainCard("D.qcow2").locator("[data-map] svg rect.dc-map__data").first().waitFor();
        summary.depths = await chainCard("D.qcow2").locator("[data-map] svg rect.dc-map__data")
                .evaluateAll(els => [...new Set(els.map(e => Number(e.dataset.depth)))].sort());
        // left alone, the page asks the daemon nothing (the test watches the bus meanwhile)
        await page.waitForTimeout(500);
        summary.idleFrom = Date.now();
        await page.waitForTimeout(3000);
        summary.idleTo = Date.now();
        await chainCard("D.qcow2").locator('[data-layer$="/B.qcow2"]').click();
        await page.waitForSelector('[data-chain$="/D.qcow2"] [data-map$="/B.qcow2"] svg rect.dc-map__data');
        await shot("chains");

        // a backup from the dialog, its progress bar watched to completion
        await chainCard("D.qcow2").locator('[data-action="backup"]').click();
        await submitDialog({ target: "D-backup.qcow2", speed: "2M", compress: true });
        await page.waitForSelector('[data-view="jobs"]:not([hidden]) [data-job]');
        let shotTaken = false;
        for (;;) {
            const pct = await page.evaluate(() => {
                const e = document.querySelector("[data-job] [data-progress]");
                return e ? Number(e.dataset.progress) : null;
            });
            if (pct === null)
                break;
            if (summary.progress[summary.progress.length - 1] !== pct)
                summary.progress.push(pct);
            if (!shotTaken && pct > 20) {
                await shot("jobs");
                shotTaken = true;
            }
            await page.waitForTimeout(100);
        }
        const notice = page.locator('[data-notice]').last();
        await notice.waitFor();
        summary.backupNotice = await notice.innerText();

        // pause and resume a job from its row, then cancel it
        await tab("chains");
        await chainCard("D.qcow2").locator('[data-action="backup"]').click();
        await submitDialog({ target: "D-slow.qcow2", speed: "256K" });
        await waitStatus("running");
        await jobRow.first().locator('[data-verb="pause"]').click();
        await waitStatus("paused");
        summary.paused = true;
        await jobRow.first().locator('[data-verb="resume"]').click();
        await waitStatus("running");
        summary.resumed = true;
        await jobRow.first().locator('[data-verb="cancel"]').click();
        await page.waitForSelector("[data-job]", { state: "detached" });

        // an intermediate commit: C into B, the job ends by itself, the chain is [A] <-- [B] <-- [D]
        await tab("chains");
        await chainCard("D.qcow2").locator('[data-action="commit"]').click();
        await submitDialog({ top: { label: "C.qcow2" }, base: { label: "B.qcow2" } });
        await page.waitForSelector('[data-notice^="commit"]');
        await tab("chains");
        await page.waitForFunction(() => [...document.querySelectorAll('[data-chain$="/D.qcow2"] [data-layer]')]
            .map(e => e.dataset.layer.split("/").pop()).join() === "A.qcow2,B.qcow2,D.qcow2");
        summary.committed = true;

        // a mirror: ready, then completed from its row; the chain's active layer is the copy
        await tab("chains");
        await chainCard("D.qcow2").locator('[data-action="mirror"]').click();
        await submitDialog({ target: "D-mirror.qcow2" });
        await waitStatus("ready");
        await page.waitForSelector('[data-job] [data-event="ready"]');
        await jobRow.first().locator('[data-verb="blocking"]').click();
        await page.waitForSelector('[data-job] [data-verb="complete"]');
        await page.waitForFunction(() => !document.querySelector('[data-job] [data-verb="blocking"]'));
        summary.writeBlocking = true;
        await jobRow.first().locator('[data-verb="complete"]').click();
        await page.waitForSelector("[data-job]", { state: "detached" });
        await tab("chains");
        await chainCard("D-mirror.qcow2").waitFor();
        summary.mirrored = await chainCard("D-mirror.qcow2").locator("[data-layer]")
                .evaluateAll(els => els.map(e => e.dataset.layer.split("/").pop()));

        // an image: created, grown, checked, deleted
        await page.click('[data-action="create-image"]');
        await submitDialog({ path: "new.qcow2", size: "16M" });
        await chainCard("new.qcow2").waitFor();
        await chainCard("new.qcow2").locator('[data-action="resize"]').click();
        await submitDialog({ size: "32M" });
        await page.waitForFunction(() => document.querySelector('[data-chain$="/new.qcow2"] .dc-layer__meta').textContent.includes("32 MiB"));
        await chainCard("new.qcow2").locator('[data-action="check"]').click();
        await submitDialog({});
        summary.check = await page.locator("[data-dialog] [data-result]").innerText();
        await page.keyboard.press("Escape");
        await chainCard("new.qcow2").locator('[data-action="delete"]').click();
        await submitDialog({});
        await chainCard("new.qcow2").waitFor({ state: "detached" });
        summary.imageLifecycle = true;

        // a bitmap from its dialog, and an incremental backup from it after a change
        await chainCard("D-mirror.qcow2").locator('[data-action="bitmaps"]').click();
        await submitDialog({ name: "nightly" });
        await page.waitForFunction(() => [...document.querySelectorAll('[data-chain$="/D-mirror.qcow2"] .dc-layer__labels')]
            .some(e => e.textContent.includes("1 bitmap")));
        summary.bitmapAdded = true;
        await chainCard("D-mirror.qcow2").locator('[data-action="bitmaps"]').click();
        await submitDialog({ name: "scratch" });
        await page.waitForFunction(() => document.querySelector('[data-chain$="/D-mirror.qcow2"] .dc-layer__labels').textContent.includes("2 bitmaps"));
        await chainCard("D-mirror.qcow2").locator('[data-action="bitmaps"]').click();
        await submitDialog({ which: "scratch", op: "DisableBitmap" });
        await chainCard("D-mirror.qcow2").locator('[data-action="bitmaps"]').click();
        await page.waitForSelector('[data-dialog] [data-bitmap="scratch"]');
        summary.disabledShown = (await page.locator('[data-dialog] [data-bitmap="scratch"]').innerText()).includes("disabled");
        await submitDialog({ which: "scratch", op: "RemoveBitmap" });
        await page.waitForFunction(() => document.querySelector('[data-chain$="/D-mirror.qcow2"] .dc-layer__labels').textContent.includes("1 bitmap"));
        summary.bitmapRemoved = true;
        await chainCard("D-mirror.qcow2").locator('[data-action="backup"]').click();
        await submitDialog({ target: "D-incr.qcow2", sync: "incremental", bitmap: "nightly" });
        await page.waitForFunction(() => [...document.querySelectorAll("[data-notice]")].some(e => e.textContent.includes("completed") && e.dataset.notice.startsWith("backup")
            && !document.querySelector("[data-job]")));
        await tab("chains");
        summary.incremental = true;

        // an export over NBD, listed with its URI
        await chainCard("D-mirror.qcow2").locator('[data-action="export"]').click();
        await submitDialog({ name: "vm" });
        await page.waitForSelector('[data-view="exports"]:not([hidden]) [data-export="vm"]');
        summary.exportUri = await page.locator('[data-export="vm"] .dc-uri').innerText();
        await shot("exports");

        // a backup plan: created, run, its restore point listed
        await tab("plans");
        await page.click('[data-action="create-plan"]');
        await submitDialog({ name: "nightly", chain: { label: "D-mirror.qcow2" }, destination: "backups" });
        await page.locator('[data-plan="nightly"] [data-action="plan-run"]').click();
        await page.waitForSelector('[data-plan="nightly"] [data-point]', { timeout: 60000 });
        summary.points = await page.locator('[data-plan="nightly"] [data-point]').count();
        await page.locator('[data-plan="nightly"] [data-action="plan-edit"]').click();
        await submitDialog({ schedule: "*-*-* 02:15:00" });
        await page.waitForFunction(() => document.querySelector('[data-plan="nightly"]').textContent.includes("*-*-* 02:15:00"));
        summary.planEdited = true;
        await shot("plans");
    }
    }
} catch (err) {
    problems.push(String(err && err.stack || err));
    try {
        await shot("failure-" + scenario);
    } catch (e) {
        /* the browser is gone */
    }
}
await browser.close();
summary.problems = problems;
console.log(JSON.stringify(summary));
process.exitCode = problems.length ? 1 : 0; /* (not exit(): stdout is a pipe, let it drain) */
