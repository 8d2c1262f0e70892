// The SDK's filesystem calls beyond read/write/list (e2b.mjs has those):
// makeDir, rename, remove, exists, watchDir, files as another user, and
// signed upload/download URLs. Run by e2b_test.go against the busybox
// template (FROM scratch: no /etc/passwd, so the test makes one).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { step, rejects, addUser } from "./lib.mjs";
import { Sandbox, SandboxError, FilesystemEventType } from "e2b";

const sbx = await step("Sandbox.create", () =>
  Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 120_000, metadata: { suite: "files", run: randomUUID() } }));

// A signed URL is made for a client without the envd token: it names the
// sandbox only by its URL. With one sandbox URL (E2B_SANDBOX_URL) the
// routing headers name the sandbox, as the SDK itself sends them.
const route = { "E2b-Sandbox-Id": sbx.sandboxId, "E2b-Sandbox-Port": "49983" };

async function until(what, cond, ms = 15_000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

try {
  await step("a user named user (uid 1000) in the image", () => addUser(sbx));

  await step("files.makeDir: true when made, false when it exists; files.exists", async () => {
    assert.equal(await sbx.files.makeDir("/tmp/fs/a/b"), true);
    assert.equal(await sbx.files.makeDir("/tmp/fs/a/b"), false);
    assert.equal(await sbx.files.exists("/tmp/fs/a/b"), true);
    assert.equal(await sbx.files.exists("/tmp/fs/nope"), false);
    const info = await sbx.files.getInfo("/tmp/fs/a/b");
    assert.equal(info.type, "dir");
  });

  await step("files.rename moves a file, making the destination's parents", async () => {
    await sbx.files.write("/tmp/fs/a/f.txt", "moving\n");
    const info = await sbx.files.rename("/tmp/fs/a/f.txt", "/tmp/fs/moved/g.txt");
    assert.equal(info.path, "/tmp/fs/moved/g.txt");
    assert.equal(info.name, "g.txt");
    assert.equal(info.type, "file");
    assert.equal(await sbx.files.exists("/tmp/fs/a/f.txt"), false);
    assert.equal(await sbx.files.read("/tmp/fs/moved/g.txt"), "moving\n");
  });

  await step("files.remove removes a tree", async () => {
    await sbx.files.remove("/tmp/fs/moved");
    assert.equal(await sbx.files.exists("/tmp/fs/moved"), false);
    assert.equal(await sbx.files.exists("/tmp/fs/moved/g.txt"), false);
  });

  await step("files.watchDir sees create, write and remove, recursively", async () => {
    await sbx.files.makeDir("/tmp/fs/w");
    const seen = [];
    const handle = await sbx.files.watchDir("/tmp/fs/w", (e) => seen.push(`${e.type} ${e.name}`), { recursive: true });
    try {
      await sbx.files.write("/tmp/fs/w/x.txt", "x");
      await sbx.commands.run("busybox mkdir /tmp/fs/w/sub && echo y > /tmp/fs/w/sub/y.txt");
      await sbx.files.remove("/tmp/fs/w/x.txt");
      const want = [`${FilesystemEventType.CREATE} x.txt`, `${FilesystemEventType.WRITE} x.txt`,
        `${FilesystemEventType.CREATE} sub`, `${FilesystemEventType.CREATE} sub/y.txt`, `${FilesystemEventType.REMOVE} x.txt`];
      await until(`events ${want.join(", ")} (seen: ${seen.join(", ")})`, () => want.every((w) => seen.includes(w)));
    } finally {
      await handle.stop();
    }
  });

  await step("files as user: owned by uid 1000, relative to /home/user, root's files refused", async () => {
    await sbx.files.write("mine.txt", "mine\n", { user: "user" });
    assert.equal(await sbx.files.read("/home/user/mine.txt", { user: "user" }), "mine\n");
    assert.equal(await sbx.files.makeDir("/home/user/d", { user: "user" }), true);
    const r = await sbx.commands.run("busybox stat -c %u:%g /home/user/mine.txt /home/user/d");
    assert.equal(r.stdout, "1000:1000\n1000:1000\n");
    await sbx.files.write("/root/secret.txt", "root only\n");
    await rejects(sbx.files.read("/root/secret.txt", { user: "user" }), SandboxError, "user reading root's file");
    await rejects(sbx.files.write("/root/x.txt", "no", { user: "user" }), SandboxError, "user writing in /root");
    await rejects(sbx.files.makeDir("/root/d", { user: "user" }), SandboxError, "user making a dir in /root");
    await rejects(sbx.files.remove("/root/secret.txt", { user: "user" }), SandboxError, "user removing root's file");
    assert.equal(await sbx.files.exists("/root/secret.txt"), true);
  });

  await step("signed upload and download URLs; tampered and expired ones refused", async () => {
    const up = await sbx.uploadUrl("/home/user/signed.txt", { user: "user", useSignatureExpiration: 120 });
    assert.match(up, /signature=v1_/);
    const form = new FormData();
    form.append("file", new Blob(["signed upload\n"]), "signed.txt");
    let res = await fetch(up, { method: "POST", body: form, headers: route });
    assert.equal(res.status, 200, await res.text());
    const r = await sbx.commands.run("busybox stat -c %u /home/user/signed.txt");
    assert.equal(r.stdout, "1000\n");

    const down = await sbx.downloadUrl("/home/user/signed.txt", { user: "user" });
    res = await fetch(down, { headers: route });
    assert.equal(res.status, 200);
    assert.equal(await res.text(), "signed upload\n");

    res = await fetch(down.replace("signed.txt", "mine.txt"), { headers: route });
    assert.equal(res.status, 401, "a signature for another path");
    res = await fetch(down, { method: "POST", body: form, headers: route });
    assert.equal(res.status, 401, "a read signature used to write");
    const expired = await sbx.downloadUrl("/home/user/signed.txt", { user: "user", useSignatureExpiration: -5 });
    res = await fetch(expired, { headers: route });
    assert.equal(res.status, 401, "an expired signature");
    assert.match(await res.text(), /expired/);
    res = await fetch(new URL("/files?path=/root/secret.txt", up), { headers: route });
    assert.equal(res.status, 401, "no token, no signature");
  });
} finally {
  await sbx.kill();
}
