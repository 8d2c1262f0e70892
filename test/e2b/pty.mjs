// PTY sessions and reattaching to running commands through kiln's envd,
// with the official `e2b` SDK (run by e2b_test.go beside e2b.mjs):
// sandbox.pty.create/sendInput/resize/kill, and commands.start in the
// background, then commands.connect(pid) to see its later output.
import assert from "node:assert/strict";
import { step, rejects } from "./lib.mjs";
import { Sandbox, CommandExitError, NotFoundError } from "e2b";

const enc = (s) => new TextEncoder().encode(s);
async function waitFor(what, cond, ms = 30_000) {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const sbx = await step("Sandbox.create", () => Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 300_000 }));
try {
  let out = "";
  const dec = new TextDecoder();
  const term = await step("pty.create({cols, rows, onData})", () =>
    sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += dec.decode(d, { stream: true }); } }));
  assert.ok(term.pid > 0);

  await step("pty.sendInput('echo hi') shows in onData", async () => {
    await sbx.pty.sendInput(term.pid, enc("echo hi-$((40+2))\n"));
    await waitFor("hi-42 in the PTY's output", () => out.includes("hi-42"));
  });

  await step("pty.resize changes the terminal's size", async () => {
    await sbx.pty.resize(term.pid, { cols: 100, rows: 30 });
    await sbx.pty.sendInput(term.pid, enc("busybox stty size\n"));
    await waitFor("'30 100' from stty size", () => out.includes("30 100"));
  });

  await step("commands.list shows the PTY", async () => {
    const list = await sbx.commands.list();
    assert.ok(list.some((p) => p.pid === term.pid), `pid ${term.pid} not in ${JSON.stringify(list)}`);
  });

  await step("pty.kill ends it (SIGKILL)", async () => {
    assert.equal(await sbx.pty.kill(term.pid), true);
    const err = await rejects(term.wait(), CommandExitError, "a killed PTY");
    assert.equal(err.exitCode, 137);
    assert.equal(await sbx.pty.kill(term.pid), false, "killing it again: not found");
  });

  await step("commands.start in background, then commands.connect(pid) sees its later output", async () => {
    const bg = await sbx.commands.start("busybox sleep 3; echo later-$((1+1)); exit 4", { background: true });
    await bg.disconnect();
    let seen = "";
    const again = await sbx.commands.connect(bg.pid, { onStdout: (d) => { seen += d; } });
    assert.equal(again.pid, bg.pid);
    const err = await rejects(again.wait(), CommandExitError, "the reattached command's exit");
    assert.equal(err.exitCode, 4);
    assert.equal(seen, "later-2\n");
    assert.equal(err.stdout, "later-2\n");
  });

  await step("commands.connect to a pid that is gone: NotFoundError", async () => {
    await rejects(sbx.commands.connect(999999), NotFoundError, "connecting to an unknown pid");
  });
} finally {
  await sbx.kill();
}
