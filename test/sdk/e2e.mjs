// End-to-end test of kiln's API with the official AWS SDK for JavaScript v3.
// The client gets nothing from us but the environment the AWS docs describe:
// AWS_ENDPOINT_URL, AWS_SHARED_CREDENTIALS_FILE and AWS_REGION.
// Run by sdk_test.go, which starts the server; exits non-zero on failure.
import * as sdk from "@aws-sdk/client-lambda-microvms";
import assert from "node:assert/strict";

const client = new sdk.LambdaMicrovmsClient({ maxAttempts: 1 });
let checks = 0;
const ok = (cond, msg) => { assert.ok(cond, msg); checks++; };

async function expectError(name, status, fn, contains) {
  try {
    await fn();
  } catch (e) {
    assert.equal(e.name, name, `want ${name}, got ${e.name}: ${e.message}`);
    assert.equal(e.$metadata.httpStatusCode, status);
    if (contains) assert.ok(e.message.includes(contains), `message ${e.message} lacks ${contains}`);
    checks++;
    return e;
  }
  assert.fail(`want ${name}, got success`);
}

async function waitFor(what, get, pred, timeoutMs = 10000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const out = await get();
    if (pred(out)) return out;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(out)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const send = (cmd) => client.send(cmd);
const name = `sdk-${Date.now()}`;
const role = "arn:aws:iam::123456789012:role/kiln-build";

// Managed base images.
const managed = await send(new sdk.ListManagedMicrovmImagesCommand({}));
ok(managed.items.length >= 1, "a managed image");
const baseImageArn = managed.items[0].imageArn;
const mv = await send(new sdk.ListManagedMicrovmImageVersionsCommand({ imageIdentifier: baseImageArn }));
ok(mv.items[0].status === "AVAILABLE", "managed version available");

// Create an image and wait until it is CREATED.
const created = await send(new sdk.CreateMicrovmImageCommand({
  name, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI || "s3://kiln-e2e/app.zip" },
  hooks: { port: 9000, microvmHooks: { run: "ENABLED", runTimeoutInSeconds: 10 } },
  environmentVariables: { GREETING: "hi" },
  tags: { suite: "sdk" },
}));
ok(created.$metadata.httpStatusCode === 201, "CreateMicrovmImage is 201");
ok(created.state === "CREATING" && created.imageVersion === "1", "image CREATING v1");
ok(created.createdAt instanceof Date && !isNaN(created.createdAt), "createdAt is a Date");
const image = await waitFor("image CREATED", () => send(new sdk.GetMicrovmImageCommand({ imageIdentifier: name })), (o) => o.state === "CREATED");
ok(image.latestActiveImageVersion === "1" && image.tags.suite === "sdk", "image CREATED with tags");
const byArn = await send(new sdk.GetMicrovmImageCommand({ imageIdentifier: created.imageArn }));
ok(byArn.name === name, "image by ARN");

const version = await send(new sdk.GetMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "1" }));
ok(version.state === "SUCCESSFUL" && version.status === "ACTIVE" && version.environmentVariables.GREETING === "hi", "version SUCCESSFUL");
const builds = await send(new sdk.ListMicrovmImageBuildsCommand({ imageIdentifier: name, imageVersion: "1" }));
ok(builds.items.length === 1, "one build");
const build = await send(new sdk.GetMicrovmImageBuildCommand({ imageIdentifier: name, imageVersion: "1", buildId: builds.items[0].buildId }));
ok(build.buildState === "SUCCESSFUL", "build SUCCESSFUL");
const images = await send(new sdk.ListMicrovmImagesCommand({ nameFilter: name }));
ok(images.items.length === 1 && images.items[0].name === name, "ListMicrovmImages");

// Run a microVM and take it through its states.
const run = await send(new sdk.RunMicrovmCommand({
  imageIdentifier: created.imageArn,
  idlePolicy: { maxIdleDurationSeconds: 60, suspendedDurationSeconds: 0, autoResumeEnabled: true },
  runHookPayload: JSON.stringify({ task: "e2e" }),
  ingressNetworkConnectors: ["ALL_INGRESS", "SHELL_INGRESS"].map((c) => `arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:${c}`),
  maximumDurationInSeconds: 3600,
}));
ok(run.state === "PENDING" && run.endpoint.startsWith(`https://${run.microvmId}.`), "RunMicrovm PENDING with endpoint");
const id = run.microvmId;
const get = () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: id }));
const running = await waitFor("RUNNING", get, (o) => o.state === "RUNNING");
ok(running.idlePolicy.maxIdleDurationSeconds === 60 && running.startedAt instanceof Date, "GetMicrovm");
const arn = (await send(new sdk.ListMicrovmsCommand({}))).items.find((m) => m.microvmId === id) && created.imageArn.replace(/microvm-image:.*/, `microvm:${id}`);
ok((await send(new sdk.GetMicrovmCommand({ microvmIdentifier: arn }))).microvmId === id, "GetMicrovm by ARN");

await send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: id }));
await waitFor("SUSPENDED", get, (o) => o.state === "SUSPENDED");
checks++;
await expectError("ConflictException", 409, () => send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: id })));
await send(new sdk.ResumeMicrovmCommand({ microvmIdentifier: id }));
await waitFor("RUNNING again", get, (o) => o.state === "RUNNING");
checks++;

const tok = await send(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 10, allowedPorts: [{ port: 8080 }, { range: { startPort: 3000, endPort: 3010 } }] }));
ok(typeof tok.authToken["X-aws-proxy-auth"] === "string", "auth token");
const shell = await send(new sdk.CreateMicrovmShellAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 5 }));
ok(Object.keys(shell.authToken).length > 0, "shell token");

// Idempotent run.
const token = `tok-${Date.now()}`;
const r1 = await send(new sdk.RunMicrovmCommand({ imageIdentifier: name, clientToken: token, maximumDurationInSeconds: 60 }));
const r2 = await send(new sdk.RunMicrovmCommand({ imageIdentifier: name, clientToken: token, maximumDurationInSeconds: 60 }));
ok(r1.microvmId === r2.microvmId, "same clientToken, same microVM");
await expectError("ConflictException", 409, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: name, clientToken: token, maximumDurationInSeconds: 61 })));

// Listing with pagination.
let seen = 0;
for await (const page of sdk.paginateListMicrovms({ client, pageSize: 1 }, { imageIdentifier: name })) {
  ok(page.items.length <= 1, "page size");
  seen += page.items.length;
}
ok(seen === 2, `paginated ${seen} microVMs, want 2`);

// Tags.
await send(new sdk.TagResourceCommand({ Resource: arn, Tags: { owner: "e2e", tmp: "1" } }));
await send(new sdk.UntagResourceCommand({ Resource: arn, TagKeys: ["tmp"] }));
const tags = await send(new sdk.ListTagsCommand({ Resource: arn }));
ok(tags.Tags.owner === "e2e" && !("tmp" in tags.Tags), "tags");

// Errors.
await expectError("ResourceNotFoundException", 404, () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: "mvm-doesnotexist" })));
await expectError("ValidationException", 400, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: name, idlePolicy: { maxIdleDurationSeconds: 10, suspendedDurationSeconds: 0, autoResumeEnabled: true } })), "maxIdleDurationSeconds");
await expectError("ValidationException", 400, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: name, maximumDurationInSeconds: 28801 })), "maximumDurationInSeconds");
const bad = new sdk.LambdaMicrovmsClient({ maxAttempts: 1, credentials: { accessKeyId: (await client.config.credentials()).accessKeyId, secretAccessKey: "wrong" } });
await expectError("AccessDeniedException", 403, () => bad.send(new sdk.ListMicrovmsCommand({})), "signature");

// Terminate.
await send(new sdk.TerminateMicrovmCommand({ microvmIdentifier: id }));
const term = await waitFor("TERMINATED", get, (o) => o.state === "TERMINATED");
ok(term.terminatedAt instanceof Date && term.stateReason, "terminated with reason");
ok(/^[0-9a-f-]{36}$/.test(term.$metadata.requestId), "request id");
await send(new sdk.TerminateMicrovmCommand({ microvmIdentifier: r1.microvmId }));

// A new version, deactivated and deleted; then the image.
const upd = await send(new sdk.UpdateMicrovmImageCommand({ imageIdentifier: name, baseImageArn, buildRoleArn: role, codeArtifact: { uri: "s3://kiln-e2e/app2.zip" }, description: "v2" }));
ok(upd.imageVersion === "2", "UpdateMicrovmImage v2");
await waitFor("image UPDATED", () => send(new sdk.GetMicrovmImageCommand({ imageIdentifier: name })), (o) => o.state === "UPDATED");
const vs = await send(new sdk.ListMicrovmImageVersionsCommand({ imageIdentifier: name }));
ok(vs.items.length === 2, "two versions");
const inactive = await send(new sdk.UpdateMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "2", status: "INACTIVE" }));
ok(inactive.status === "INACTIVE", "version INACTIVE");
const dv = await send(new sdk.DeleteMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "2" }));
ok(dv.state === "DELETED", "version deleted");
const di = await send(new sdk.DeleteMicrovmImageCommand({ imageIdentifier: name }));
ok(di.state === "DELETED", "image deleted");
await expectError("ResourceNotFoundException", 404, () => send(new sdk.GetMicrovmImageCommand({ imageIdentifier: name })));

console.log(`OK ${checks} checks`);
