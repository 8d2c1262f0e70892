// Drives kiln's web console headless in each browser of KILN_BROWSERS, one
// after the other, against one real `kiln server` with real microVMs;
// run by console_test.go, which passes:
//   KILN_BROWSERS      name=path,... with name chromium (driven over the
//                      Chrome DevTools Protocol) or firefox (over WebDriver
//                      BiDi), e.g. chromium=/usr/bin/chromium,firefox=/usr/bin/firefox-esr
//   KILN_CONSOLE_URL   http://127.0.0.1:PORT/console/
//   KILN_ADMIN_ID/KILN_ADMIN_SECRET    the operator's key
//   KILN_ADMIN_ACCOUNT                 the operator's account
//   KILN_TENANT_ID/KILN_TENANT_SECRET  a second account's key
//   KILN_CODE_ZIP      the app's code package (Dockerfile + app + busybox)
//   KILN_SHOTS         folder for the screenshots (one folder per browser)
//   KILN_FIREFOX_HOME  a HOME for Firefox owned by this user (Firefox
//                      refuses a root run with another user's HOME)
// Every browser runs the same checks; elements are found through the
// browser's own accessibility tree (::-p-aria: role and accessible name),
// so a control a screen reader cannot name is a control the test cannot
// find.
import puppeteer from "puppeteer-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const consoleURL = env("KILN_CONSOLE_URL");
const apiOrigin = new URL(consoleURL).origin;
const t0 = Date.now();
const step = (s) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${s}`);

// aria finds by role and accessible name in the accessibility tree; scope
// is a CSS selector the element must be inside.
const aria = (role, name, scope = "") => `${scope ? scope + " " : ""}::-p-aria([name=${JSON.stringify(name)}][role="${role}"])`;
const rowSel = (attr, id) => `tr[data-${attr}="${id}"]`;
const regionSel = (name) => `section[aria-label=${JSON.stringify(name)}]`;

// secretField finds the password field by its accessible name alone:
// Firefox gives password fields no role its accessibility locator matches,
// and matches their <label> by that name too (so take the label's control).
async function secretField(page, name) {
  const h = await page.waitForSelector(`::-p-aria(${JSON.stringify(name)})`);
  const f = (await h.evaluateHandle((e) => e.control || e)).asElement();
  if (!(await f.evaluate((e) => e.type === "password"))) throw new Error(`"${name}" is not a password field`);
  return f;
}
async function fillSecret(page, name, value) {
  const f = await secretField(page, name);
  await f.evaluate((e) => { e.value = ""; });
  await f.type(value);
}

// until polls fn in the page (every 200 ms: headless pages may not paint,
// so no requestAnimationFrame) until it returns something truthy.
const until = (page, fn, arg, timeout = 30000) => page.waitForFunction(fn, { timeout, polling: 200 }, arg);

// hasText waits for an element matching sel whose text contains text.
const hasText = (page, sel, text, timeout) =>
  until(page, ([sel, text]) => [...document.querySelectorAll(sel)].some((e) => e.textContent.includes(text)), [sel, text], timeout);

async function waitState(page, attr, id, states, timeout) {
  const h = await until(
    page,
    ([sel, states]) => {
      const s = [...document.querySelectorAll(sel + " .state")].map((e) => e.textContent.trim()).find((t) => states.includes(t));
      return s || false;
    },
    [rowSel(attr, id), [].concat(states)],
    timeout,
  );
  return h.jsonValue();
}

// gotoRetry navigates, again when Chromium aborted the load because the
// host's network changed (ERR_NETWORK_CHANGED: kiln and other tests add and
// remove VM interfaces all the time; Chromium aborts loads in flight then).
async function gotoRetry(page, url) {
  for (let i = 0; ; i++) {
    try {
      const r = await page.goto(url);
      if (!/^(chrome-error:|about:neterror)/.test(page.url())) return r;
      if (i >= 3) throw new Error(`loading ${url} ended on an error page`);
    } catch (e) {
      if (i >= 3 || !String(e).includes("ERR_NETWORK_CHANGED")) throw e;
    }
    step(`loading ${url} was interrupted by a network change; again`);
  }
}

async function launch(name, path, home) {
  if (name === "firefox") {
    return puppeteer.launch({
      browser: "firefox",
      executablePath: path,
      headless: true,
      acceptInsecureCerts: true,
      protocolTimeout: 60000,
      defaultViewport: { width: 1280, height: 900 },
      env: { ...process.env, HOME: home, MOZ_CRASHREPORTER_DISABLE: "1", MOZ_DISABLE_AUTO_SAFE_MODE: "1" },
      // Keep it off the network: no captive-portal or connectivity probe,
      // no remote settings or update check.
      extraPrefsFirefox: {
        "network.captive-portal-service.enabled": false,
        "network.connectivity-service.enabled": false,
        "services.settings.server": "",
        "app.update.disabledForTesting": true,
        "browser.safebrowsing.update.enabled": false,
      },
    });
  }
  return puppeteer.launch({
    browser: "chrome",
    executablePath: path,
    headless: true,
    acceptInsecureCerts: true,
    protocolTimeout: 60000,
    defaultViewport: { width: 1280, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
}

// run goes through every check in one browser; the image and the microVM
// are its own (named after the browser), so runs do not see each other's.
async function run(browserName, path) {
  const shots = join(env("KILN_SHOTS"), browserName);
  mkdirSync(shots, { recursive: true });
  const shot = (page, file, fullPage = true) => page.screenshot({ path: join(shots, file), fullPage });
  const start = Date.now();
  let checks = 0;
  const ok = (cond, what) => {
    if (!cond) throw new Error(`FAILED [${browserName}]: ${what}`);
    checks++;
    step(`${browserName} ok: ${what}`);
  };
  const browser = await launch(browserName, path, process.env.KILN_FIREFOX_HOME || process.env.HOME);
  step(`${browserName}: ${await browser.version()} (${((Date.now() - start) / 1000).toFixed(1)}s to launch)`);

  // No request may leave for anywhere but kiln: the API address and the
  // microVM endpoints (*.microvm.localhost).
  const foreign = [];
  const errors = [];
  const watch = (page) => {
    page.on("request", (r) => {
      const u = new URL(r.url());
      if (u.protocol === "data:" || u.protocol === "blob:") return;
      if (u.origin !== apiOrigin && !u.hostname.endsWith(".microvm.localhost")) foreign.push(r.url());
    });
    return page;
  };
  // A fresh context: no cookies shared with another one.
  const newPage = async (ctx) => {
    const p = watch(await ctx.newPage());
    p.setDefaultTimeout(30000);
    return p;
  };

  async function signIn(page, id, secret) {
    await gotoRetry(page, consoleURL);
    await page.locator(aria("textbox", "Access key ID")).fill(id);
    await fillSecret(page, "Secret access key", secret);
    await page.locator(aria("button", "Sign in")).click();
    await page.waitForSelector(aria("button", "Sign out"));
  }

  // unlabelled lists the visible form controls and buttons without an
  // accessible name from a label, aria-label or their text.
  const unlabelled = (page) =>
    page.evaluate(() =>
      [...document.querySelectorAll("input, select, textarea, button, a[href]")]
        .filter((e) => e.getClientRects().length && e.type !== "hidden")
        .filter((e) => {
          const texts = [e.getAttribute("aria-label"), ...[...(e.labels || [])].map((l) => l.textContent)];
          if (e.matches("button, a")) texts.push(e.textContent);
          return !texts.some((t) => t && t.trim());
        })
        .map((e) => e.outerHTML.slice(0, 80)),
    );

  try {
    const admin = await browser.createBrowserContext();
    const page = await newPage(admin);
    page.on("pageerror", (e) => errors.push(String(e)));
    // Expected refusals (401 before sign-in, 403 for a wrong secret) log
    // "Failed to load resource" in Chromium; anything else is a bug of the page.
    page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && errors.push(m.text()));

    // Sign-in: a wrong secret is refused in the API's words.
    await gotoRetry(page, consoleURL);
    await page.waitForSelector(aria("button", "Sign in"));
    await shot(page, "01-sign-in.png");
    ok((await unlabelled(page)).length === 0, "every control of the sign-in page has a label");
    await page.locator(aria("textbox", "Access key ID")).fill(env("KILN_ADMIN_ID"));
    await fillSecret(page, "Secret access key", "wrong");
    await page.locator(aria("button", "Sign in")).click();
    await hasText(page, '[role="alert"]', "AccessDeniedException");
    ok(true, "a wrong secret is refused with AccessDeniedException");
    await signIn(page, env("KILN_ADMIN_ID"), env("KILN_ADMIN_SECRET"));
    const sess = (await admin.cookies()).find((c) => c.name === "kiln_console");
    ok(sess && sess.httpOnly && sess.sameSite === "Strict" && sess.path === "/console/", "session cookie is HttpOnly, SameSite=Strict, scoped to /console/");

    // Images: create from the zip and watch the build log stream to CREATED.
    const name = `console-app-${browserName}`;
    await page.locator(aria("link", "Images")).click();
    await page.locator("summary::-p-text(Create an image)").click();
    const form = 'form[aria-label="Create an image"]';
    await page.waitForSelector(aria("form", "Create an image"));
    await page.locator(aria("textbox", "Name", form)).fill(name);
    const zip = await page.waitForSelector(`${form} input[type=file][name=zip]`);
    ok((await zip.evaluate((e) => [...e.labels].map((l) => l.textContent).join(" "))).includes("Code package (zip)"), "the zip input is labelled");
    await zip.uploadFile(env("KILN_CODE_ZIP"));
    await page.locator(aria("spinbutton", "Hooks port", form)).fill("9000");
    await page.locator(aria("textbox", "Environment variables (KEY=VALUE per line)", form)).fill("GREETING=console");
    ok((await unlabelled(page)).length === 0, `every control of the image form has a label${await unlabelled(page)}`);
    await page.locator(aria("button", "Create image", form)).click();
    const logName = `Build log of ${name} version 1.0`;
    await page.waitForSelector(aria("region", logName), { timeout: 30000 });
    await until(page, (sel) => { const l = document.querySelector(sel + " [data-testid=log]"); return l && l.textContent !== "(no output yet)"; }, regionSel(logName), 120000);
    const streaming = await page.$eval(regionSel(logName), (e) => e.textContent.includes("streaming…"));
    step(`${browserName}: build log shows output (${streaming ? "while streaming" : "already complete"})`);
    await shot(page, "02-image-building.png");
    // CREATED, or fail at once on CREATE_FAILED with the build's words.
    if ((await waitState(page, "image", name, ["CREATED", "CREATE_FAILED"], 240000)) === "CREATE_FAILED") {
      throw new Error(`image build failed:\n${await page.$eval("section.detail", (e) => e.innerText).catch(() => "")}`);
    }
    await hasText(page, regionSel(logName) + " .badge", "complete", 10000);
    const logText = await page.$eval(regionSel(logName) + " [data-testid=log]", (e) => e.innerText);
    ok(logText.length > 0, `build log streamed to CREATED (${logText.split("\n").length} lines)`);
    await shot(page, "03-images.png");

    // MicroVMs: run one from this image and see RUNNING.
    await page.locator(aria("link", "MicroVMs")).click();
    await page.waitForSelector(aria("table", "MicroVMs"));
    const before = await page.$$eval("tr[data-microvm]", (rs) => rs.map((r) => r.dataset.microvm));
    await page.locator("summary::-p-text(Run a microVM)").click();
    const runForm = 'form[aria-label="Run a microVM"]';
    await page.waitForSelector(aria("form", "Run a microVM"));
    const option = await until(page, ([sel, name]) => [...document.querySelectorAll(sel + " select[name=image] option")].find((o) => o.textContent.startsWith(name))?.value, [runForm, name], 15000);
    await page.select(aria("combobox", "Image", runForm), await option.jsonValue());
    ok((await unlabelled(page)).length === 0, "every control of the run form has a label");
    await page.locator(aria("button", "Run", runForm)).click();
    const idHandle = await until(page, (before) => [...document.querySelectorAll("tr[data-microvm]")].map((r) => r.dataset.microvm).find((id) => !before.includes(id)), before, 30000);
    const id = await idHandle.jsonValue();
    const vmRow = rowSel("microvm", id);
    await waitState(page, "microvm", id, "RUNNING", 120000);
    ok(true, `microVM ${id} RUNNING`);
    ok((await page.$eval(vmRow, (e) => e.innerText)).includes(`${id}.microvm.localhost`), "the list shows its endpoint");
    await shot(page, "04-microvms.png");

    // Auth token → the endpoint in a new tab answers.
    await page.locator(aria("button", "Create auth token", vmRow)).click();
    const link = aria("link", "Open endpoint in a new tab", vmRow);
    await page.waitForSelector(link);
    const opened = admin.waitForTarget((t) => t.type() === "page" && t.url().includes(".microvm.localhost"), { timeout: 30000 });
    await page.locator(link).click();
    const tab = watch(await (await opened).page());
    // Watch the address from here, not by script in the tab: Chromium's
    // error page does not answer it.
    const errorPage = /^(chrome-error:|about:neterror)/;
    for (const end = Date.now() + 30000; ; await new Promise((r) => setTimeout(r, 200))) {
      const u = tab.url();
      if (errorPage.test(u) || (u.includes(".microvm.localhost") && !u.includes("kiln-proxy-auth"))) break;
      if (Date.now() > end) throw new Error(`the endpoint's tab is still at ${u}`);
    }
    if (errorPage.test(tab.url())) await gotoRetry(tab, await page.$eval(link, (a) => a.href));
    const tabURL = tab.url();
    ok(!tabURL.includes("kiln-proxy-auth"), `the token left the address bar (${tabURL})`);
    const hello = await gotoRetry(tab, new URL("/hello", tabURL).toString());
    const helloText = await tab.evaluate(() => document.body.innerText);
    ok(hello.status() === 200 && helloText.includes("hello console from v1"), `endpoint answers through the token: ${helloText.trim()}`);
    await shot(tab, "05-endpoint-tab.png", false);
    await tab.close();

    // App log streams.
    await page.locator(aria("button", "App log", vmRow)).click();
    await page.waitForSelector(aria("region", `App log of ${id}`));
    await hasText(page, regionSel(`App log of ${id}`), "request GET /hello", 30000);
    ok(true, "app log shows the app's output");

    // Suspend and resume.
    await page.locator(aria("button", "Suspend", vmRow)).click();
    await waitState(page, "microvm", id, "SUSPENDED", 120000);
    ok(true, "suspended");
    await page.locator(aria("button", "Resume", vmRow)).click();
    await waitState(page, "microvm", id, "RUNNING", 120000);
    ok(true, "resumed");

    // The browser shell: echo hello.
    await page.locator(aria("button", "Shell", vmRow)).click();
    const shell = regionSel(`Shell in ${id}`);
    await page.waitForSelector(aria("region", `Shell in ${id}`));
    await hasText(page, shell + " [role=status]", "Connected", 60000).catch(async (e) => {
      throw new Error(`shell: ${await page.$eval(shell, (s) => s.innerText).catch(() => "")}: ${e.message}`);
    });
    const spill = await page.$eval(shell + " [data-testid=terminal]", (box) => {
      const b = box.getBoundingClientRect(), x = box.querySelector(".xterm").getBoundingClientRect();
      return x.bottom > b.bottom + 0.5 || x.right > b.right + 0.5 ? `terminal ${x.right}x${x.bottom} past its box ${b.right}x${b.bottom}` : "";
    });
    ok(!spill, `the terminal fits its box${spill ? ": " + spill : ""}`);
    await page.locator(shell + " [data-testid=terminal]").click();
    await new Promise((r) => setTimeout(r, 500));
    await page.keyboard.type("echo hello\n");
    const termRows = () => [...(document.querySelector(".xterm-rows")?.children || [])].map((r) => r.textContent.trim());
    await until(page, `(${termRows})().includes("hello")`, null, 30000);
    ok(true, "`echo hello` in the browser shell printed hello");
    // Resize reaches the shell: after a narrower window, stty reports it.
    await page.setViewport({ width: 900, height: 900 });
    await new Promise((r) => setTimeout(r, 500));
    await page.keyboard.type("stty size\n");
    await until(page, `(${termRows})().some((t) => /^\\d+ \\d+$/.test(t))`, null, 15000);
    const size = await page.evaluate(`(${termRows})().filter((t) => /^\\d+ \\d+$/.test(t)).pop()`);
    step(`${browserName}: stty size in the shell: ${size}`);
    await page.setViewport({ width: 1280, height: 900 });
    await shot(page, "06-shell.png");

    // Usage and health.
    await page.locator(aria("link", "Usage and health")).click();
    await page.waitForSelector(aria("region", "MicroVMs by state"));
    await page.waitForSelector(aria("table", "Usage per account"));
    ok(true, "usage page shows microVMs by state and per-account usage");
    await shot(page, "07-usage.png");

    // Phone width (375 px): every page fits without sideways scrolling,
    // and the microVM's actions are on screen.
    await page.setViewport({ width: 375, height: 812 });
    for (const [link, what, file] of [["Usage and health", aria("table", "Usage per account"), "08-usage-phone.png"], ["Images", aria("table", "Images"), "08-images-phone.png"], ["MicroVMs", vmRow, "08-microvms-phone.png"]]) {
      await page.locator(aria("link", link)).click();
      await page.waitForSelector(what);
      const wide = await page.evaluate(() =>
        [document.documentElement, ...document.querySelectorAll(".scroll, main, header")]
          .filter((e) => e.scrollWidth > e.clientWidth + 1)
          .map((e) => `${e.tagName.toLowerCase()}.${e.className} ${e.scrollWidth}>${e.clientWidth}`),
      );
      ok(wide.length === 0, `at 375 px the ${link} page has no sideways scrolling${wide.length ? ": " + wide.join(", ") : ""}`);
      await shot(page, file);
    }
    const off = await page.$$eval(`${vmRow} button`, (bs) => bs.filter((b) => { const r = b.getBoundingClientRect(); return r.left < 0 || r.right > innerWidth; }).map((b) => b.textContent));
    ok(off.length === 0, `at 375 px the microVM's actions are on screen${off.length ? ": " + off.join(", ") : ""}`);
    await page.setViewport({ width: 1280, height: 900 });

    // A tenant sees none of this, and cannot act in the operator's
    // account. It signs in and moves with the keyboard alone.
    const tenant = await browser.createBrowserContext();
    const tp = await newPage(tenant);
    await gotoRetry(tp, consoleURL);
    await tp.waitForSelector(aria("button", "Sign in"));
    const focused = () => tp.evaluate(() => { const e = document.activeElement; return e ? (e.getAttribute("name") || e.textContent.trim()) : ""; });
    await tp.keyboard.press("Tab");
    ok((await focused()) === "accessKeyId", `Tab from the top reaches Access key ID first (got ${await focused()})`);
    await tp.keyboard.type(env("KILN_TENANT_ID"));
    await tp.keyboard.press("Tab");
    await tp.keyboard.type(env("KILN_TENANT_SECRET"));
    await tp.keyboard.press("Enter");
    await tp.waitForSelector(aria("button", "Sign out"));
    await tp.waitForSelector(aria("table", "MicroVMs"));
    ok(true, "signed in with the keyboard alone");
    ok((await tp.$$("tr[data-microvm]")).length === 0, "the tenant's microVM list is empty");
    // Tab through the header to the Images link: each stop has a visible
    // focus ring, and Enter follows the link.
    const stops = [];
    for (let i = 0; i < 10 && stops.at(-1)?.text !== "Images"; i++) {
      await tp.keyboard.press("Tab");
      stops.push(await tp.evaluate(() => {
        const e = document.activeElement;
        const s = getComputedStyle(e);
        return { text: e.textContent.trim(), ring: s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0 };
      }));
    }
    ok(stops.at(-1)?.text === "Images", `Tab reaches the Images link (stops: ${stops.map((s) => s.text).join(" → ")})`);
    ok(stops.every((s) => s.ring), `every keyboard stop shows a focus ring${stops.filter((s) => !s.ring).map((s) => ": " + s.text).join("")}`);
    await tp.keyboard.press("Enter");
    await tp.waitForSelector(aria("table", "Images"));
    ok((await tp.$$("tr[data-image]")).length === 0, "Enter on the focused link opened the tenant's Images page, and it is empty");
    const probe = await tp.evaluate(async ([id, admin]) => {
      const s = await (await fetch("/console/api/session")).json();
      const h = { "X-Kiln-Csrf": s.csrfToken };
      const get = await fetch(`/console/api/aws/2025-09-09/microvms/${id}`);
      const as = await fetch(`/console/api/aws/2025-09-09/microvms`, { headers: { "X-Kiln-Account": admin } });
      const kill = await fetch(`/console/api/aws/2025-09-09/microvms/${id}`, { method: "DELETE", headers: h });
      const noCsrf = await fetch(`/console/api/aws/2025-09-09/microvms/${id}/suspend`, { method: "POST" });
      return { get: get.status, getType: get.headers.get("x-amzn-ErrorType"), as: as.status, kill: kill.status, noCsrf: noCsrf.status };
    }, [id, env("KILN_ADMIN_ACCOUNT")]);
    ok(probe.get === 404 && probe.getType.startsWith("ResourceNotFoundException"), `tenant GetMicrovm of the operator's VM: ${probe.get} ${probe.getType}`);
    ok(probe.as === 403, `tenant acting in the operator's account: ${probe.as}`);
    ok(probe.kill === 404, `tenant TerminateMicrovm of the operator's VM: ${probe.kill}`);
    ok(probe.noCsrf === 403, `a state change without the CSRF token is refused: ${probe.noCsrf}`);
    await tenant.close();

    // Terminate.
    page.once("dialog", (d) => d.accept());
    await page.locator(aria("button", "Terminate", vmRow)).click();
    await page.locator(aria("checkbox", "Show terminated")).click();
    await waitState(page, "microvm", id, "TERMINATED", 120000);
    ok(true, "terminated");

    // Sign out, then the session is refused.
    const csrf = await page.evaluate(async () => (await (await fetch("/console/api/session")).json()).csrfToken);
    await page.locator(aria("button", "Sign out")).click();
    await page.waitForSelector(aria("button", "Sign in"));
    const after = await page.evaluate(async (csrf) => {
      const r = await fetch("/console/api/aws/2025-09-09/microvms");
      const w = await fetch("/console/api/aws/2025-09-09/microvms", { method: "POST", headers: { "X-Kiln-Csrf": csrf, "Content-Type": "application/json" }, body: "{}" });
      return [r.status, w.status];
    }, csrf);
    ok(after[0] === 401 && after[1] === 401, `after sign-out the API refuses the browser: ${after}`);
    ok(foreign.length === 0, `no request left for another host${foreign.length ? ": " + foreign.join(", ") : ""}`);
    ok(errors.length === 0, `no script errors on the page${errors.length ? ": " + errors.join(" | ") : ""}`);
  } catch (e) {
    console.error(e);
    try {
      for (const p of await browser.pages()) await p.screenshot({ path: join(shots, `failure-${Date.now()}.png`), fullPage: true });
    } catch {}
    return { checks, secs: (Date.now() - start) / 1000, failed: true };
  } finally {
    await browser.close().catch((e) => console.error(`closing ${browserName}: ${e}`));
  }
  return { checks, secs: (Date.now() - start) / 1000, failed: false };
}

let failed = false;
const summary = [];
for (const spec of env("KILN_BROWSERS").split(",")) {
  const [name, path] = spec.split("=");
  const r = await run(name, path);
  failed ||= r.failed;
  summary.push(`${name}: ${r.checks} checks ${r.failed ? "then FAILED" : "passed"} in ${r.secs.toFixed(1)}s`);
}
for (const s of summary) console.log(s);
process.exit(failed ? 1 : 0);
