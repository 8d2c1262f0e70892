// Drives kiln's E2B-compatible API with the official `e2b` SDK, unmodified,
// configured only through its documented environment (E2B_API_KEY,
// E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN) and Node's NODE_EXTRA_CA_CERTS.
// Run by e2b_test.go; KILN_* variables name the template, a key of another
// account and where to record the sandbox id.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { step, rejects, steps } from "./lib.mjs";
import { Sandbox, CommandExitError, SandboxNotFoundError, AuthenticationError, NotFoundError } from "e2b";

const template = process.env.KILN_TEMPLATE;
const run = randomUUID();
const sbx = await step("Sandbox.create from a kiln image", () =>
  Sandbox.create(template, { timeoutMs: 120_000, metadata: { suite: "e2b", run }, envs: { GREETING: "hello from kiln" } }));
writeFileSync(process.env.KILN_SANDBOX_ID_FILE, sbx.sandboxId);
console.log(`sandbox ${sbx.sandboxId}, getHost(8080) = ${sbx.getHost(8080)}`);
assert.match(sbx.getHost(8080), new RegExp(`^8080-${sbx.sandboxId}\\.microvm\\.localhost:\\d+$`));

try {
  await step("commands.run('echo hello')", async () => {
    const r = await sbx.commands.run("echo hello");
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, "hello\n");
    assert.equal(r.stderr, "");
  });

  await step("env vars of the sandbox and of the command; stderr; exit code", async () => {
    const err = await rejects(sbx.commands.run("echo $GREETING $EXTRA; echo oops >&2; exit 3", { envs: { EXTRA: "and more" } }),
      CommandExitError, "a failing command");
    assert.equal(err.exitCode, 3);
    assert.equal(err.stdout, "hello from kiln and more\n");
    assert.equal(err.stderr, "oops\n");
  });

  await step("streamed output reaches onStdout as it is printed", async () => {
    const seen = [];
    const r = await sbx.commands.run("for i in 1 2 3; do echo line $i; busybox sleep 0.3; done", { onStdout: (d) => seen.push(d) });
    assert.equal(r.stdout, "line 1\nline 2\nline 3\n");
    assert.ok(seen.length >= 2, `output came in ${seen.length} chunk(s)`);
  });

  await step("files.write / read round-trip; list shows it", async () => {
    const info = await sbx.files.write("/tmp/e2b/hello.txt", "hi there\n");
    assert.equal(info.path, "/tmp/e2b/hello.txt");
    assert.equal(await sbx.files.read("/tmp/e2b/hello.txt"), "hi there\n");
    const r = await sbx.commands.run("busybox cat /tmp/e2b/hello.txt");
    assert.equal(r.stdout, "hi there\n", "the command sees the written file");
    await sbx.commands.run("echo made by a command > /tmp/e2b/other.txt");
    assert.equal(await sbx.files.read("/tmp/e2b/other.txt"), "made by a command\n");
    const entries = await sbx.files.list("/tmp/e2b");
    const names = entries.map((e) => e.name).sort();
    assert.deepEqual(names, ["hello.txt", "other.txt"]);
    const hello = entries.find((e) => e.name === "hello.txt");
    assert.equal(hello.type, "file");
    assert.equal(hello.size, 9);
    assert.equal(hello.path, "/tmp/e2b/hello.txt");
    await rejects(sbx.files.read("/tmp/e2b/missing.txt"), NotFoundError, "reading a missing file");
  });

  await step("getInfo and list by metadata", async () => {
    const info = await sbx.getInfo();
    assert.equal(info.sandboxId, sbx.sandboxId);
    assert.equal(info.templateId, template);
    assert.equal(info.state, "running");
    assert.deepEqual(info.metadata, { suite: "e2b", run });
    const page = Sandbox.list({ query: { metadata: { run } } });
    const items = await page.nextItems();
    assert.deepEqual(items.map((s) => s.sandboxId), [sbx.sandboxId]);
    const none = await Sandbox.list({ query: { metadata: { run: "another run" } } }).nextItems();
    assert.equal(none.length, 0);
  });

  await step("setTimeout moves the end", async () => {
    await sbx.setTimeout(60_000);
    const left = (await sbx.getInfo()).endAt.getTime() - Date.now();
    assert.ok(left > 45_000 && left <= 61_000, `ends in ${left} ms`);
  });

  await step("another account's key sees no such sandbox", async () => {
    await rejects(Sandbox.getInfo(sbx.sandboxId, { apiKey: process.env.KILN_OTHER_KEY }), SandboxNotFoundError, "another account");
    await rejects(Sandbox.getInfo(sbx.sandboxId, { apiKey: "e2b_" + "0".repeat(40) }), AuthenticationError, "a wrong key");
  });

  await step("pause, then connect resumes with the files kept", async () => {
    assert.equal(await sbx.pause(), true);
    assert.equal((await sbx.getInfo()).state, "paused");
    const again = await Sandbox.connect(sbx.sandboxId);
    assert.equal((await again.getInfo()).state, "running");
    const r = await again.commands.run("busybox cat /tmp/e2b/hello.txt");
    assert.equal(r.stdout, "hi there\n");
  });
} finally {
  await step("kill", async () => {
    assert.equal(await sbx.kill(), true);
  });
}

await step("a killed sandbox is not found", async () => {
  await rejects(Sandbox.getInfo(sbx.sandboxId), SandboxNotFoundError, "getInfo after kill");
  assert.equal(await Sandbox.kill(sbx.sandboxId), false);
});
console.log(`all ${steps.length} steps passed`);
