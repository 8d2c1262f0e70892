// E2B tags and names on a kiln image built through the AWS API (every kiln
// image is a template by name): Template.assignTags, getTags, removeTags,
// Sandbox.create('NAME:TAG'), and the template's ENV reaching envd's
// commands; tags are the account's own.
import assert from "node:assert/strict";
import { step, rejects, steps } from "./lib.mjs";
import { Sandbox, Template } from "e2b";

const template = process.env.KILN_TEMPLATE;
const other = { apiKey: process.env.KILN_OTHER_KEY };

await step("an AWS-built image is a template: Template.exists, no tags yet", async () => {
  assert.equal(await Template.exists(template), true);
  assert.equal(await Template.exists(template, other), false);
  assert.deepEqual(await Template.getTags(template), []);
});

const assigned = await step("Template.assignTags(NAME, 'stable') tags its newest build", () => Template.assignTags(template, "stable"));
assert.deepEqual(assigned.tags, ["stable"]);
assert.match(assigned.buildId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);

await step("Template.getTags lists it; NAME:stable names the same build for assignTags", async () => {
  const tags = await Template.getTags(template);
  assert.equal(tags.length, 1);
  assert.equal(tags[0].tag, "stable");
  assert.equal(tags[0].buildId, assigned.buildId);
  assert.ok(tags[0].createdAt instanceof Date && !isNaN(tags[0].createdAt));
  const again = await Template.assignTags(`${template}:stable`, ["prod", "blue"]);
  assert.equal(again.buildId, assigned.buildId);
  assert.deepEqual((await Template.getTags(template)).map((t) => t.tag).sort(), ["blue", "prod", "stable"]);
});

await step("another account neither sees nor tags the template", async () => {
  await rejects(Template.getTags(template, other), Error, "another account's getTags");
  await rejects(Template.assignTags(template, "mine", other), Error, "another account's assignTags");
  await rejects(Sandbox.create(`${template}:prod`, { ...other, timeoutMs: 30_000 }), Error, "another account's tag");
});

const sbx = await step("Sandbox.create('NAME:prod') runs the tagged build", () => Sandbox.create(`${template}:prod`, { timeoutMs: 120_000 }));
try {
  await step("the template's ENV reaches commands (PATH=/bin from its Dockerfile); a command's envs win", async () => {
    let r = await sbx.commands.run("echo $PATH");
    assert.equal(r.stdout, "/bin\n");
    r = await sbx.commands.run("echo $PATH", { envs: { PATH: "/bin:/sbin" } });
    assert.equal(r.stdout, "/bin:/sbin\n");
  });
} finally {
  await sbx.kill();
}

await step("Template.removeTags; a removed tag no longer starts a sandbox", async () => {
  await Template.removeTags(template, ["prod", "blue"]);
  assert.deepEqual((await Template.getTags(template)).map((t) => t.tag), ["stable"]);
  const err = await rejects(Sandbox.create(`${template}:prod`, { timeoutMs: 30_000 }), Error, "a removed tag");
  assert.match(err.message, /not found/);
  await rejects(Template.removeTags(template, "prod"), Error, "removing a tag twice");
  await Template.removeTags(template, "stable");
});
console.log(`all ${steps.length} steps passed`);
