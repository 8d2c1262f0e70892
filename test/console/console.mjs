// Drives kiln's web console in Debian's Chromium (headless) against a real
// `kiln server` with real microVMs; run by console_test.go, which passes:
//   KILN_CONSOLE_URL   http://127.0.0.1:PORT/console/
//   KILN_ADMIN_ID/KILN_ADMIN_SECRET    the operator's key
//   KILN_TENANT_ID/KILN_TENANT_SECRET  a second account's key
//   KILN_CODE_ZIP      the app's code package (Dockerfile + app + busybox)
//   KILN_SHOTS         folder for the screenshots
//   KILN_CHROMIUM      the browser (default /usr/bin/chromium)
import { chromium } from "playwright-core";
import { join } from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const consoleURL = env("KILN_CONSOLE_URL");
const apiOrigin = new URL(consoleURL).origin;
const shots = env("KILN_SHOTS");
const t0 = Date.now();
const step = (s) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${s}`);
let checks = 0;
const ok = (cond, what) => {
  if (!cond) throw new Error(`FAILED: ${what}`);
  checks++;
  step(`ok: ${what}`);
};

// launch() gives Chromium a fresh, empty profile of its own (a temporary
// --user-data-dir, removed at close).
const browser = await chromium.launch({
  executablePath: process.env.KILN_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
// The endpoint's certificate comes from kiln's own CA, which this fresh
// profile does not trust (a user imports DATA_DIR/ca.pem once).
const newContext = (viewport = { width: 1280, height: 900 }) => browser.newContext({ viewport, ignoreHTTPSErrors: true });

// No request may leave for anywhere but kiln: the API address and the
// microVM endpoints (*.microvm.localhost).
const foreign = [];
const watch = (ctx) =>
  ctx.on("request", (r) => {
    const u = new URL(r.url());
    if (u.protocol === "data:" || u.protocol === "blob:") return;
    if (u.origin !== apiOrigin && !u.hostname.endsWith(".microvm.localhost")) foreign.push(r.url());
  });

async function signIn(page, id, secret) {
  await page.goto(consoleURL);
  await page.getByLabel("Access key ID").fill(id);
  await page.getByLabel("Secret access key").fill(secret);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("button", { name: "Sign out" }).waitFor();
}

const row = (page, attr, id) => page.locator(`tr[data-${attr}="${id}"]`);
async function waitState(page, attr, id, state, timeout) {
  await row(page, attr, id).locator(`.state:text-is("${state}")`).first().waitFor({ timeout });
}

let failed = false;
try {
  const admin = await newContext();
  watch(admin);
  const page = await admin.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // Expected refusals (401 before sign-in, 403 for a wrong secret) log
  // "Failed to load resource"; anything else is a bug of the page.
  page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && errors.push(m.text()));

  // Sign-in: a wrong secret is refused in the API's words.
  await page.goto(consoleURL);
  await page.screenshot({ path: join(shots, "01-sign-in.png") });
  await page.getByLabel("Access key ID").fill(env("KILN_ADMIN_ID"));
  await page.getByLabel("Secret access key").fill("wrong");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "AccessDeniedException" }).waitFor();
  ok(true, "a wrong secret is refused with AccessDeniedException");
  await signIn(page, env("KILN_ADMIN_ID"), env("KILN_ADMIN_SECRET"));
  const cookies = await admin.cookies();
  const sess = cookies.find((c) => c.name === "kiln_console");
  ok(sess && sess.httpOnly && sess.sameSite === "Strict" && sess.path === "/console/", "session cookie is HttpOnly, SameSite=Strict, scoped to /console/");

  // Images: create from the zip and watch the build log stream to CREATED.
  const name = "console-app";
  await page.getByRole("link", { name: "Images" }).click();
  await page.getByText("Create an image").click();
  const form = page.getByRole("form", { name: "Create an image" });
  await form.getByLabel("Name").fill(name);
  await form.getByLabel("Code package (zip)").setInputFiles(env("KILN_CODE_ZIP"));
  await form.getByLabel("Hooks port").fill("9000");
  await form.getByLabel("Environment variables (KEY=VALUE per line)").fill("GREETING=console");
  await form.getByRole("button", { name: "Create image" }).click();
  await waitState(page, "image", name, "CREATING", 30000).catch(() => {});
  const log = page.getByRole("region", { name: `Build log of ${name} version 1` });
  await log.waitFor({ timeout: 30000 });
  await log.getByTestId("log").filter({ hasNotText: "(no output yet)" }).waitFor({ timeout: 120000 });
  const streaming = await log.getByText("streaming…").isVisible();
  step(`build log shows output (${streaming ? "while streaming" : "already complete"})`);
  await page.screenshot({ path: join(shots, "02-image-building.png"), fullPage: true });
  // CREATED, or fail at once on CREATE_FAILED with the build's words.
  await row(page, "image", name).locator(`.state:text-is("CREATED"), .state:text-is("CREATE_FAILED")`).first().waitFor({ timeout: 240000 });
  if (await row(page, "image", name).locator(`.state:text-is("CREATE_FAILED")`).count()) {
    throw new Error(`image build failed:\n${await page.locator("section.detail").innerText()}`);
  }
  await log.getByText("complete").waitFor({ timeout: 10000 });
  const logText = await log.getByTestId("log").innerText();
  ok(logText.length > 0, `build log streamed to CREATED (${logText.split("\n").length} lines)`);
  await page.screenshot({ path: join(shots, "03-images.png"), fullPage: true });

  // MicroVMs: run one and see RUNNING.
  await page.getByRole("link", { name: "MicroVMs" }).click();
  await page.getByText("Run a microVM").click();
  const run = page.getByRole("form", { name: "Run a microVM" });
  await run.locator("select[name=image] option").filter({ hasText: name }).first().waitFor({ state: "attached", timeout: 15000 });
  await run.getByRole("button", { name: "Run" }).click();
  const vmRow = page.locator("tr[data-microvm]").first();
  await vmRow.waitFor({ timeout: 30000 });
  const id = await vmRow.getAttribute("data-microvm");
  await waitState(page, "microvm", id, "RUNNING", 120000);
  ok(true, `microVM ${id} RUNNING`);
  ok((await row(page, "microvm", id).innerText()).includes(`${id}.microvm.localhost`), "the list shows its endpoint");
  await page.screenshot({ path: join(shots, "04-microvms.png"), fullPage: true });

  // Auth token → the endpoint in a new tab answers.
  await row(page, "microvm", id).getByRole("button", { name: "Create auth token" }).click();
  const link = row(page, "microvm", id).getByRole("link", { name: "Open endpoint in a new tab" });
  await link.waitFor();
  const [tab] = await Promise.all([admin.waitForEvent("page"), link.click()]);
  await tab.waitForLoadState();
  ok(!tab.url().includes("kiln-proxy-auth"), `the token left the address bar (${tab.url()})`);
  const hello = await tab.goto(new URL("/hello", tab.url()).toString());
  const helloText = await hello.text();
  ok(hello.status() === 200 && helloText.includes("hello console from v1"), `endpoint answers through the token: ${helloText}`);
  await tab.screenshot({ path: join(shots, "05-endpoint-tab.png") });
  await tab.close();

  // App log streams.
  await row(page, "microvm", id).getByRole("button", { name: "App log" }).click();
  await page.getByRole("region", { name: `App log of ${id}` }).getByText("request GET /hello").waitFor({ timeout: 30000 });
  ok(true, "app log shows the app's output");

  // Suspend and resume.
  await row(page, "microvm", id).getByRole("button", { name: "Suspend" }).click();
  await waitState(page, "microvm", id, "SUSPENDED", 120000);
  ok(true, "suspended");
  await row(page, "microvm", id).getByRole("button", { name: "Resume" }).click();
  await waitState(page, "microvm", id, "RUNNING", 120000);
  ok(true, "resumed");

  // The browser shell: echo hello.
  await row(page, "microvm", id).getByRole("button", { name: "Shell" }).click();
  const shell = page.getByRole("region", { name: `Shell in ${id}` });
  await shell.getByText("Connected").waitFor({ timeout: 60000 });
  await shell.getByTestId("terminal").click();
  await page.waitForTimeout(500);
  await page.keyboard.type("echo hello\n");
  await page.waitForFunction(() => {
    const rows = document.querySelector(".xterm-rows");
    return rows && [...rows.children].some((r) => r.textContent.trim() === "hello");
  }, null, { timeout: 30000 });
  ok(true, "`echo hello` in the browser shell printed hello");
  // Resize reaches the shell: after a narrower window, stty reports it.
  await page.setViewportSize({ width: 900, height: 900 });
  await page.waitForTimeout(500);
  await page.keyboard.type("stty size\n");
  await page.waitForFunction(() => {
    const rows = document.querySelector(".xterm-rows");
    return rows && [...rows.children].some((r) => /^\d+ \d+$/.test(r.textContent.trim()));
  }, null, { timeout: 15000 });
  const size = await page.evaluate(() => [...document.querySelector(".xterm-rows").children].map((r) => r.textContent.trim()).filter((t) => /^\d+ \d+$/.test(t)).pop());
  step(`stty size in the shell: ${size}`);
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.screenshot({ path: join(shots, "06-shell.png"), fullPage: true });

  // Usage and health.
  await page.getByRole("link", { name: "Usage and health" }).click();
  await page.getByRole("region", { name: "MicroVMs by state" }).waitFor();
  await page.getByRole("table", { name: "Usage per account" }).waitFor();
  ok(true, "usage page shows microVMs by state and per-account usage");
  await page.screenshot({ path: join(shots, "07-usage.png"), fullPage: true });

  // Phone width: the microVM list still works (screenshot for review).
  await page.getByRole("link", { name: "MicroVMs" }).click();
  await row(page, "microvm", id).waitFor();
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: join(shots, "08-microvms-phone.png"), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });

  // A tenant sees none of this, and cannot act in the operator's account.
  const tenant = await newContext();
  watch(tenant);
  const tp = await tenant.newPage();
  await signIn(tp, env("KILN_TENANT_ID"), env("KILN_TENANT_SECRET"));
  await tp.getByRole("table", { name: "MicroVMs" }).waitFor();
  ok((await tp.locator("tr[data-microvm]").count()) === 0, "the tenant's microVM list is empty");
  await tp.getByRole("link", { name: "Images" }).click();
  await tp.getByRole("table", { name: "Images" }).waitFor();
  ok((await tp.locator("tr[data-image]").count()) === 0, "the tenant's image list is empty");
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
  await row(page, "microvm", id).getByRole("button", { name: "Terminate" }).click();
  await page.getByLabel("Show terminated").check();
  await waitState(page, "microvm", id, "TERMINATED", 120000);
  ok(true, "terminated");

  // Sign out, then the session is refused.
  const csrf = await page.evaluate(async () => (await (await fetch("/console/api/session")).json()).csrfToken);
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("button", { name: "Sign in" }).waitFor();
  const after = await page.evaluate(async (csrf) => {
    const r = await fetch("/console/api/aws/2025-09-09/microvms");
    const w = await fetch("/console/api/aws/2025-09-09/microvms", { method: "POST", headers: { "X-Kiln-Csrf": csrf, "Content-Type": "application/json" }, body: "{}" });
    return [r.status, w.status];
  }, csrf);
  ok(after[0] === 401 && after[1] === 401, `after sign-out the API refuses the browser: ${after}`);
  ok(foreign.length === 0, `no request left for another host${foreign.length ? ": " + foreign.join(", ") : ""}`);
  ok(errors.length === 0, `no script errors on the page${errors.length ? ": " + errors.join(" | ") : ""}`);
} catch (e) {
  failed = true;
  console.error(e);
  try {
    for (const ctx of browser.contexts()) for (const p of ctx.pages()) await p.screenshot({ path: join(shots, `failure-${Date.now()}.png`), fullPage: true });
  } catch {}
} finally {
  await browser.close();
}
console.log(`${checks} checks passed in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
process.exit(failed ? 1 : 0);
