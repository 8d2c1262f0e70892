// kiln's own CLI on an E2B sandbox (run by e2b_test.go beside e2b.mjs):
// `kiln exec` and `kiln cp` reach a sandbox of the same account with the
// AWS API's shell token, as for any microVM (E2B sandboxes run with
// SHELL_INGRESS); the shell port stays closed to a request without one.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { step } from "./lib.mjs";
import { Sandbox } from "e2b";

function kiln(args, input) {
  const r = spawnSync(process.env.KILN_BIN, ["--data-dir", process.env.KILN_DATA_DIR, ...args], { input, timeout: 120_000 });
  return { code: r.status, stdout: r.stdout?.toString() ?? "", stderr: r.stderr?.toString() ?? "" };
}
const api = ["--endpoint-url", process.env.E2B_API_URL];

const sbx = await step("Sandbox.create", () => Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 300_000 }));
try {
  await step("kiln exec ID -- CMD: output and exit status", async () => {
    const r = kiln(["exec", ...api, "-n", sbx.sandboxId, "--", "/bin/sh", "-c", "echo out-$((40+2)); echo err >&2; exit 3"]);
    assert.equal(r.code, 3, `exit status; stderr: ${r.stderr}`);
    assert.equal(r.stdout, "out-42\n");
    assert.match(r.stderr, /err/);
  });

  await step("kiln exec takes stdin", async () => {
    const r = kiln(["exec", ...api, sbx.sandboxId, "--", "busybox", "tr", "a-z", "A-Z"], "piped\n");
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "PIPED\n");
  });

  const dir = mkdtempSync(join(tmpdir(), "kiln-cp-"));
  await step("kiln cp LOCAL ID:PATH, read back with the SDK", async () => {
    writeFileSync(join(dir, "up.txt"), "from the host\n");
    const r = kiln(["cp", ...api, join(dir, "up.txt"), `${sbx.sandboxId}:/tmp/up.txt`]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(await sbx.files.read("/tmp/up.txt"), "from the host\n");
  });

  await step("kiln cp ID:PATH LOCAL of a file the SDK wrote", async () => {
    await sbx.files.write("/tmp/down.txt", "from the sandbox\n");
    const r = kiln(["cp", ...api, `${sbx.sandboxId}:/tmp/down.txt`, join(dir, "down.txt")]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(readFileSync(join(dir, "down.txt"), "utf8"), "from the sandbox\n");
  });

  await step("the shell port without a kiln token is refused", async () => {
    const res = await fetch(`${process.env.E2B_SANDBOX_URL}/`, {
      headers: { "E2b-Sandbox-Id": sbx.sandboxId, "E2b-Sandbox-Port": "8022" } });
    assert.equal(res.status, 401, `status ${res.status}: ${await res.text()}`);
  });
} finally {
  await sbx.kill();
}
