// lifecycle.autoResume with the official `e2b` SDK: a paused sandbox made
// with it resumes on traffic through the endpoint proxy (its ports and
// envd alike), as kiln resumes a microVM whose idle policy says so; one
// made without it stays paused and its traffic gets E2B's 502.
import assert from "node:assert/strict";
import { step, rejects, until } from "./lib.mjs";
import { Sandbox, SandboxNotFoundError } from "e2b";

const template = process.env.KILN_TEMPLATE;
const get = (sbx) => fetch(`${process.env.E2B_SANDBOX_URL}/hello.txt`,
  { headers: { "E2b-Sandbox-Id": sbx.sandboxId, "E2b-Sandbox-Port": "8080" } });
const state = async (sbx) => (await Sandbox.getInfo(sbx.sandboxId)).state;

const made = [];
try {
  const sbx = await step("create with lifecycle autoResume", async () => {
    const sbx = await Sandbox.create(template, { timeoutMs: 120_000, lifecycle: { onTimeout: "pause", autoResume: true } });
    made.push(sbx);
    assert.deepEqual((await sbx.getInfo()).lifecycle, { onTimeout: "pause", autoResume: true });
    await sbx.files.write("/hello.txt", "awake");
    return sbx;
  });

  await step("a request to one of its ports resumes the paused sandbox", async () => {
    await sbx.pause();
    assert.equal(await state(sbx), "paused");
    const r = await get(sbx);
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "awake");
    assert.equal(await state(sbx), "running");
  });

  await step("an envd call resumes it too, with its memory", async () => {
    const boot = (await sbx.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout;
    await sbx.pause();
    assert.equal((await sbx.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout, boot);
    assert.equal(await state(sbx), "running");
  });

  await step("paused by its timeout, traffic resumes it for E2B's resume timeout", async () => {
    await sbx.setTimeout(2_000);
    await until("the timeout pauses it", 60_000, async () => (await state(sbx)) === "paused");
    assert.equal((await get(sbx)).status, 200);
    const info = await sbx.getInfo();
    assert.equal(info.state, "running");
    const left = info.endAt.getTime() - Date.now();
    assert.ok(left > 200_000 && left <= 300_000, `runs on for ${left} ms`);
  });

  await step("without autoResume traffic does not wake it: 502, still paused", async () => {
    const other = await Sandbox.create(template, { timeoutMs: 120_000, lifecycle: { onTimeout: "pause" } });
    made.push(other);
    await other.files.write("/hello.txt", "asleep");
    await other.pause();
    const r = await get(other);
    assert.equal(r.status, 502);
    assert.match((await r.json()).message, /paused/);
    // The SDK reads the 502 of a process call as a sandbox not running.
    await rejects(other.commands.run("echo no"), SandboxNotFoundError, "an envd call to a paused sandbox");
    assert.equal(await state(other), "paused");
    await Sandbox.connect(other.sandboxId, { timeoutMs: 120_000 });
    assert.equal(await (await get(other)).text(), "asleep");
  });
} finally {
  for (const sbx of made) await sbx.kill().catch(() => {});
}
