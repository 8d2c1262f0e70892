// E2B's error classes as SDK code meets them against kiln (run by
// e2b_test.go beside e2b.mjs), one step per class not covered elsewhere:
// TimeoutError (a command over its timeoutMs), RateLimitError (an account
// over its microVM quota), InvalidArgumentError, FileNotFoundError, and
// SandboxError for a permission refusal: listing or stat-ing root's 0700
// directory as another user. (NotFoundError, SandboxNotFoundError,
// AuthenticationError and CommandExitError: e2b.mjs, control.mjs, pty.mjs.)
import assert from "node:assert/strict";
import { step, rejects, addUser, kiln, adminAccount } from "./lib.mjs";
import {
  Sandbox, SandboxError, TimeoutError, RateLimitError, InvalidArgumentError,
  NotFoundError, FileNotFoundError, CommandExitError,
} from "e2b";

const sbx = await step("Sandbox.create", () => Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 300_000 }));
try {
  await step("a user named user (uid 1000) and root's 0700 /root", async () => {
    await addUser(sbx);
    await sbx.commands.run("busybox touch /root/secret");
  });

  await step("files.list of root's 0700 dir as user: SandboxError permission_denied", async () => {
    const err = await rejects(sbx.files.list("/root", { user: "user" }), SandboxError, "user listing /root");
    assert.ok(!(err instanceof NotFoundError), `a refusal is not 'not found': ${err.message}`);
    assert.match(err.message, /permission_denied/);
    const mine = await sbx.files.list("/root", { user: "root" });
    assert.ok(mine.some((e) => e.name === "secret"), "root lists /root");
  });

  await step("files.getInfo and files.exists inside it as user: the same refusal", async () => {
    const err = await rejects(sbx.files.getInfo("/root/secret", { user: "user" }), SandboxError, "user stat-ing /root/secret");
    assert.match(err.message, /permission_denied/);
    await rejects(sbx.files.exists("/root/secret", { user: "user" }), SandboxError, "user asking whether /root/secret exists");
    assert.equal(await sbx.files.exists("/root/secret", { user: "root" }), true);
  });

  await step("commands.run over its timeoutMs: TimeoutError", async () => {
    await rejects(sbx.commands.run("busybox sleep 30", { timeoutMs: 2_000 }), TimeoutError, "a command over its timeout");
  });

  await step("files.read of a missing file: FileNotFoundError", async () => {
    await rejects(sbx.files.read("/tmp/no-such-file"), FileNotFoundError, "reading a missing file");
  });

  await step("files.list of a file: InvalidArgumentError", async () => {
    await sbx.files.write("/tmp/plain.txt", "x");
    await rejects(sbx.files.list("/tmp/plain.txt"), InvalidArgumentError, "listing a file");
  });

  await step("a failing command: CommandExitError with its code and output", async () => {
    const err = await rejects(sbx.commands.run("echo out; echo err >&2; exit 7"), CommandExitError, "exit 7");
    assert.equal(err.exitCode, 7);
    assert.equal(err.stdout, "out\n");
    assert.equal(err.stderr, "err\n");
  });
} finally {
  await sbx.kill();
}

await step("Sandbox.create over the account's microVM quota: RateLimitError", async () => {
  const account = adminAccount();
  kiln("quotas", "set", account, "--microvms", "0");
  try {
    await rejects(Sandbox.create(process.env.KILN_TEMPLATE), RateLimitError, "create over quota");
  } finally {
    kiln("quotas", "set", account, "--reset");
  }
});
