// Background commands and directory watches across sandbox.pause() and
// Sandbox.connect() (resume with memory kept), with the official `e2b`
// SDK (run by e2b_test.go beside e2b.mjs): a command started before the
// pause is listed, reattached with further output, takes stdin and is
// killed after the resume; a watch started before the pause either goes
// on or ends with an error saying to watch again.
import assert from "node:assert/strict";
import { step, rejects } from "./lib.mjs";
import { Sandbox, CommandExitError } from "e2b";

async function waitFor(what, cond, ms = 30_000) {
  const until = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > until) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const sbx = await step("Sandbox.create", () => Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 300_000 }));
try {
  let before = "";
  const bg = await step("commands.start in background (ticks, echoes stdin)", async () => {
    const h = await sbx.commands.start(
      "i=0; while true; do echo tick-$i; i=$((i+1)); if read -t 1 x; then echo got-$x; fi; done",
      { background: true, stdin: true, onStdout: (d) => { before += d; } });
    await waitFor("a tick before the pause", () => before.includes("tick-1"));
    // Its stream may end with the pause (or see the kill): not awaited.
    h.wait().catch(() => {});
    return h;
  });

  const watched = "/tmp/resume-watch";
  let events = [], exitErr;
  let watchEnded = false;
  await step("files.watchDir before the pause", async () => {
    await sbx.files.makeDir(watched);
    await sbx.files.watchDir(watched, (e) => { events.push(e); }, {
      onExit: (err) => { watchEnded = true; exitErr = err; } });
    await sbx.files.write(`${watched}/a.txt`, "a");
    await waitFor("an event for a.txt", () => events.some((e) => e.name === "a.txt"));
  });

  let again;
  await step("pause, then connect resumes the sandbox", async () => {
    assert.equal(await sbx.pause(), true);
    again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 300_000 });
    assert.equal((await again.getInfo()).state, "running");
  });

  await step("commands.list still shows the background command", async () => {
    const list = await again.commands.list();
    assert.ok(list.some((p) => p.pid === bg.pid), `pid ${bg.pid} not in ${JSON.stringify(list)}`);
  });

  let after = "";
  const h = await step("commands.connect(pid) streams its further output", async () => {
    const h = await again.commands.connect(bg.pid, { onStdout: (d) => { after += d; } });
    assert.equal(h.pid, bg.pid);
    await waitFor("ticks after the resume", () => (after.match(/tick-/g) ?? []).length >= 2);
    return h;
  });

  await step("commands.sendStdin reaches it after the resume", async () => {
    await again.commands.sendStdin(bg.pid, "resumed\n");
    await waitFor("got-resumed", () => after.includes("got-resumed"));
  });

  await step("commands.kill ends it after the resume", async () => {
    assert.equal(await again.commands.kill(bg.pid), true);
    const err = await rejects(h.wait(), CommandExitError, "the killed command");
    assert.equal(err.exitCode, 137);
    const list = await again.commands.list();
    assert.ok(!list.some((p) => p.pid === bg.pid), `pid ${bg.pid} still listed after the kill`);
  });

  await step("the watch from before the pause goes on or ends with a clear error", async () => {
    await again.files.write(`${watched}/b.txt`, "b");
    await waitFor("an event for b.txt or the watch's end", () => watchEnded || events.some((e) => e.name === "b.txt"));
    if (watchEnded && !events.some((e) => e.name === "b.txt")) {
      assert.ok(exitErr, "the watch ended without an error");
      assert.match(exitErr.message, /paused|watch .*again/, `the watch's end: ${exitErr.message}`);
      console.log(`     the watch ended: ${exitErr.message}`);
    } else {
      console.log("     the watch went on");
    }
  });
} finally {
  await sbx.kill();
}
