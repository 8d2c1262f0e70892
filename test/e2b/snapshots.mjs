// Snapshots and forks with the official `e2b` SDK: a snapshot copies a
// sandbox's disk and memory (a running process and its variables) into a
// template of the account; sandboxes made from it start where the source
// was, each on its own copy, and the source runs on. Fork is a snapshot
// and sandboxes from it in one call.
import assert from "node:assert/strict";
import { step, rejects, kiln, adminAccount, storageUsed } from "./lib.mjs";
import { Sandbox, RateLimitError } from "e2b";

const template = process.env.KILN_TEMPLATE;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A process that holds a counter in its memory only: USR1 adds one and
// writes the count to /count.
// setsid: a command's processes end with it, and this one must not.
const counter = `setsid sh -c 'n=41; trap "n=\\$((n+1)); echo \\$n > /count" USR1; echo $$ > /counter.pid; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &`;

// bump signals the counter and waits for the count it then writes.
async function bump(sbx, want) {
  await sbx.commands.run("kill -USR1 $(cat /counter.pid)");
  const end = Date.now() + 30_000;
  for (;;) {
    const got = (await sbx.commands.run("cat /count 2>/dev/null; true")).stdout.trim();
    if (got === String(want)) return;
    if (Date.now() > end) assert.fail(`${sbx.sandboxId}: count is ${got}, want ${want}`);
    await sleep(300);
  }
}

const made = [];
try {
  const src = await step("a sandbox with a file and a process holding a counter", async () => {
    const sbx = await Sandbox.create(template, { timeoutMs: 300_000, envs: { FROM_SOURCE: "yes" } });
    made.push(sbx);
    await sbx.files.write("/mark", "from the source\n");
    await sbx.commands.run(counter);
    await bump(sbx, 42);
    return sbx;
  });

  const account = adminAccount();
  const before = storageUsed(account);
  const snap = await step("createSnapshot: the source runs on", async () => {
    const s = await src.createSnapshot();
    assert.ok(s.snapshotId, "a snapshot id");
    assert.deepEqual(s.names, [s.snapshotId]);
    const info = await src.getInfo();
    assert.equal(info.state, "running");
    assert.equal((await src.commands.run("cat /mark")).stdout, "from the source\n");
    return s;
  });

  await step("a snapshot counts toward the storage quota; one beyond it is refused", async () => {
    // The template's 512 MiB of memory and the disk the sandbox wrote.
    const used = storageUsed(account);
    assert.ok(used - before > 512 * 2 ** 20, `storage in use went from ${before} to ${used}`);
    kiln("quotas", "set", account, "--storage-bytes", String(used + 2 ** 20));
    try {
      await rejects(src.createSnapshot(), RateLimitError, "a snapshot over the storage quota");
    } finally {
      kiln("quotas", "set", account, "--reset");
    }
    assert.equal((await src.getInfo()).state, "running");
    assert.equal(storageUsed(account), used);
    const all = await Sandbox.listSnapshots().nextItems();
    assert.deepEqual(all.map((s) => s.snapshotId), [snap.snapshotId]);
  });

  await step("listSnapshots finds it, by sandbox too", async () => {
    const all = await Sandbox.listSnapshots().nextItems();
    assert.ok(all.some((s) => s.snapshotId === snap.snapshotId), JSON.stringify(all));
    const mine = await Sandbox.listSnapshots({ sandboxId: src.sandboxId }).nextItems();
    assert.deepEqual(mine.map((s) => s.snapshotId), [snap.snapshotId]);
    const none = await Sandbox.listSnapshots({ sandboxId: "mvm-0" }).nextItems();
    assert.deepEqual(none, []);
  });

  const [a, b] = await step("two sandboxes from the snapshot", async () => {
    const out = [];
    for (let i = 0; i < 2; i++) {
      const sbx = await Sandbox.create(snap.snapshotId, { timeoutMs: 300_000 });
      made.push(sbx);
      out.push(sbx);
    }
    assert.notEqual(out[0].sandboxId, out[1].sandboxId);
    return out;
  });

  await step("each sees the file, the env vars and the process's memory", async () => {
    for (const sbx of [a, b]) {
      assert.equal((await sbx.commands.run("cat /mark")).stdout, "from the source\n");
      assert.equal((await sbx.commands.run("echo $FROM_SOURCE")).stdout, "yes\n");
      // A fresh identity, like every clone: its own hostname.
      assert.equal((await sbx.commands.run("hostname")).stdout.trim(), sbx.sandboxId);
      await bump(sbx, 43);
    }
  });

  await step("changes in one show in neither the other nor the source", async () => {
    await a.files.write("/only-a", "a\n");
    await bump(a, 44);
    assert.equal(await b.files.exists("/only-a"), false);
    assert.equal(await src.files.exists("/only-a"), false);
    assert.equal((await b.commands.run("cat /count")).stdout.trim(), "43");
    assert.equal((await src.commands.run("cat /count")).stdout.trim(), "42");
    await bump(src, 43);
    await b.files.write("/mark", "b\n");
    assert.equal((await a.commands.run("cat /mark")).stdout, "from the source\n");
    assert.equal((await src.commands.run("cat /mark")).stdout, "from the source\n");
  });

  await step("a paused sandbox is snapshotted and stays paused", async () => {
    await src.pause();
    const s = await Sandbox.createSnapshot(src.sandboxId, { name: `named-${Date.now()}` });
    assert.equal((await src.getInfo()).state, "paused");
    const c = await Sandbox.create(s.snapshotId, { timeoutMs: 120_000 });
    made.push(c);
    await bump(c, 44);
    assert.equal(await Sandbox.deleteSnapshot(s.snapshotId), true);
    assert.equal(await Sandbox.deleteSnapshot(s.snapshotId), false);
    // Its sandbox runs on after the snapshot is deleted.
    assert.equal((await c.commands.run("cat /mark")).stdout, "from the source\n");
    await Sandbox.connect(src.sandboxId, { timeoutMs: 300_000 });
  });

  await step("fork: a new sandbox where the source is", async () => {
    const forks = await src.fork({ count: 1, timeoutMs: 120_000 });
    assert.equal(forks.length, 1);
    const [f] = forks;
    assert.ok(f instanceof Sandbox, `fork failed: ${f?.message}`);
    made.push(f);
    assert.equal((await f.commands.run("cat /count")).stdout.trim(), "43");
    await bump(f, 44);
    assert.equal((await src.commands.run("cat /count")).stdout.trim(), "43");
    // The fork's snapshot is not kept.
    const all = await Sandbox.listSnapshots().nextItems();
    assert.deepEqual(all.map((s) => s.snapshotId), [snap.snapshotId]);
  });

  await step("deleteSnapshot removes it; its sandboxes run on", async () => {
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true);
    assert.deepEqual(await Sandbox.listSnapshots().nextItems(), []);
    assert.equal((await a.commands.run("cat /count")).stdout.trim(), "44");
  });
} finally {
  for (const sbx of made) await sbx.kill().catch(() => {});
}
