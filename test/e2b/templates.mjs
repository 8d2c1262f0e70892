// E2B templates built by the SDK's own builder (Template()...,
// Template.build) through kiln's image builder: a Debian template whose
// steps (env, workdir, a copied file, a command, a start and a ready
// command) each leave a trace a sandbox of it then reads, and its ENV,
// WORKDIR and USER are those of envd's commands. Also: build
// logs and status as E2B reports them, the alias check, the template list,
// and 400s for what kiln cannot build.
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { step, rejects, steps } from "./lib.mjs";
import { Sandbox, Template, BuildError } from "e2b";

const name = "e2b-tpl-debian";
const ctxDir = mkdtempSync(join(tmpdir(), "kiln-e2b-tpl-"));
writeFileSync(join(ctxDir, "hello.txt"), "copied by the template\n");

const template = Template({ fileContextPath: ctxDir })
  .fromDebianImage("bookworm")
  .setEnvs({ KILN_GREETING: "set by setEnvs" })
  .setWorkdir("/opt/app")
  .copy("hello.txt", "/opt/app/hello.txt")
  .runCmd('echo "runCmd saw $KILN_GREETING in $(pwd)" > /opt/app/run.txt')
  .setUser("nobody")
  .setStartCmd('echo "$KILN_GREETING" > /tmp/start-env.txt; pwd > /tmp/start-pwd.txt; touch /tmp/started; exec sleep infinity',
    "test -f /tmp/started");

await step("Template.build refuses a registry image and a Debian other than 12, saying what to use", async () => {
  const err = await rejects(Template.build(Template().fromPythonImage("3.12").runCmd("true"), "e2b-tpl-bad", { memoryMB: 512 }),
    BuildError, "a python base");
  assert.match(err.message, /no access to container registries.*fromDebianImage/);
  const err2 = await rejects(Template.build(Template().fromDebianImage("trixie"), "e2b-tpl-bad", { memoryMB: 512 }),
    BuildError, "debian trixie");
  assert.match(err2.message, /debian-12/);
});

const logs = [];
const info = await step("Template.build(template, name) builds a kiln image from debian", () =>
  Template.build(template, name, { memoryMB: 512, onBuildLogs: (e) => logs.push(e) }));
assert.equal(info.templateId, name);
assert.ok(logs.some((e) => /COPY/.test(e.message)), "the build log names the COPY step");
assert.ok(logs.some((e) => /snapshot/.test(e.message)), "the build log reaches the snapshot");
assert.ok(logs.every((e) => e.timestamp instanceof Date && !isNaN(e.timestamp)), "entries have timestamps");

await step("Template.exists; the build's status is ready", async () => {
  assert.equal(await Template.exists(name), true);
  assert.equal(await Template.exists("e2b-tpl-none"), false);
  const status = await Template.getBuildStatus(info);
  assert.equal(status.status, "ready");
});

const sbx = await step("Sandbox.create(name) runs the template", () => Sandbox.create(name, { timeoutMs: 120_000 }));
try {
  await step("every step left its trace", async () => {
    const r = await sbx.commands.run("cat /opt/app/hello.txt /opt/app/run.txt /tmp/start-env.txt /tmp/start-pwd.txt");
    assert.equal(r.stdout, "copied by the template\nrunCmd saw set by setEnvs in /opt/app\nset by setEnvs\n/opt/app\n");
  });
  await step("commands run with the template's ENV, WORKDIR and USER; a command's envs, cwd and user win", async () => {
    const show = 'echo "$KILN_GREETING|$(pwd)|$(id -un)"';
    let r = await sbx.commands.run(show);
    assert.equal(r.stdout, "set by setEnvs|/opt/app|nobody\n");
    r = await sbx.commands.run(show, { envs: { KILN_GREETING: "per command" }, cwd: "/tmp", user: "root" });
    assert.equal(r.stdout, "per command|/tmp|root\n");
  });
  await step("a rebuild with an unchanged template reuses kiln's caches; its tag names it", async () => {
    const t0 = Date.now();
    const again = await Template.build(template, `${name}:rebuilt`, { memoryMB: 512 });
    console.log(`rebuild took ${Date.now() - t0} ms`);
    const tags = await Template.getTags(name);
    assert.deepEqual(tags.map((t) => [t.tag, t.buildId]), [["rebuilt", again.buildId]]);
  });
} finally {
  await sbx.kill();
}
console.log(`all ${steps.length} steps passed`);
