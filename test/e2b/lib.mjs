// Shared by the E2B SDK scripts e2b_test.go runs: named steps that print
// ok/FAIL with their time, and a check that a promise fails with one of the
// SDK's error classes.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";

export const steps = [];
export async function step(name, fn) {
  const t0 = performance.now();
  try {
    const out = await fn();
    steps.push(`ok   ${name} (${Math.round(performance.now() - t0)} ms)`);
    console.log(steps.at(-1));
    return out;
  } catch (err) {
    console.log(`FAIL ${name}: ${err?.stack ?? err}`);
    throw err;
  }
}
export async function rejects(promise, cls, what) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof cls, `${what}: got ${err?.constructor?.name}: ${err?.message}`);
    return err;
  }
  assert.fail(`${what}: no error`);
}

// addUser gives a busybox sandbox a user named user (uid 1000, home
// /home/user) and makes /root root's alone (0700).
export async function addUser(sbx) {
  await sbx.commands.run(
    "busybox mkdir -p /etc /home/user /root && busybox chmod 700 /root && " +
      "printf 'root:x:0:0::/root:/bin/sh\\nuser:x:1000:1000::/home/user:/bin/sh\\n' > /etc/passwd && " +
      "printf 'root:x:0:\\nuser:x:1000:\\n' > /etc/group && busybox chown 1000:1000 /home/user");
}

// until polls fn (at most limitMs) until it returns a truthy value.
export async function until(what, limitMs, fn) {
  const end = Date.now() + limitMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) assert.fail(`${what}: not within ${limitMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}


// kiln runs the kiln command on the server's data directory.
export const kiln = (...args) => execFileSync(process.env.KILN_BIN, ["--data-dir", process.env.KILN_DATA_DIR, ...args]).toString();

// adminAccount is the account of the server's admin key (the one
// E2B_API_KEY belongs to, whose image the template is): the only access
// key in the store.
export function adminAccount() {
  const rows = kiln("keys", "list").trim().split("\n").slice(1);
  assert.equal(rows.length, 1, `one access key expected: ${rows}`);
  return rows[0].split(/\s+/)[1];
}

// storageUsed is what `kiln quotas get` says account uses of its
// StorageBytes quota.
export function storageUsed(account) {
  const row = kiln("quotas", "get", account).split("\n").find((l) => l.split(/\s+/)[1] === "StorageBytes");
  assert.ok(row, "a StorageBytes row");
  return Number(row.trim().split(/\s+/).at(-1));
}
