// End-to-end test of kiln's API with the official AWS SDK for JavaScript v3,
// against a real `kiln server` (real microVMs). The SDK client gets nothing
// from us but the environment the AWS docs describe: AWS_ENDPOINT_URL,
// AWS_SHARED_CREDENTIALS_FILE and AWS_REGION. The test's own inputs:
//   KILN_CODE_URI, KILN_CODE_URI_2  code packages (zips) of version 1 and 2
//                                   (version 1 is an s3:// URI on a real
//                                   S3-compatible store)
//   KILN_HOST_CODE_URI              a file:// package on the host
//   KILN_ROLE_ARN                   an execution role of the roles file
//   KILN_IMDS_OUT                   where to write the credentials the
//                                   guest got from its metadata service
//   KILN_CA                         the endpoint CA (DATA_DIR/ca.pem)
//   KILN_TENANT_KEY_ID, KILN_TENANT_SECRET  a key of a second account
// Run by sdk_test.go, which starts the server; exits non-zero on failure.
import * as sdk from "@aws-sdk/client-lambda-microvms";
import assert from "node:assert/strict";
import https from "node:https";
import { readFileSync, writeFileSync } from "node:fs";

for (const v of ["KILN_CODE_URI", "KILN_CODE_URI_2", "KILN_HOST_CODE_URI", "KILN_ROLE_ARN", "KILN_IMDS_OUT", "KILN_CA", "KILN_TENANT_KEY_ID", "KILN_TENANT_SECRET"]) {
  if (!process.env[v]) throw new Error(`${v} is not set`);
}
const ca = readFileSync(process.env.KILN_CA);

const client = new sdk.LambdaMicrovmsClient({ maxAttempts: 1 });
let checks = 0;
const ok = (cond, msg) => { assert.ok(cond, msg); checks++; };
const t0 = Date.now();
const step = (msg) => console.log(`${((Date.now() - t0) / 1000).toFixed(1)}s ${msg}`);

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

// waitFor polls until pred holds; a final state other than the one awaited
// fails at once, with the record (its stateReason says why).
async function waitFor(what, get, pred, timeoutMs, fail = () => false) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const out = await get();
    if (pred(out)) return out;
    if (fail(out)) throw new Error(`waiting for ${what}: ${JSON.stringify(out)}`);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(out)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// fetchEndpoint makes an HTTPS request to a microVM's endpoint: the host
// ID.DOMAIN resolves to the loopback address the server's proxy listens on,
// and the certificate must chain to kiln's CA.
function fetchEndpoint(endpoint, path, headers = {}) {
  const u = new URL(path, endpoint);
  return new Promise((resolve, reject) => {
    const req = https.request(u, {
      ca, headers, timeout: 30000,
      lookup: (host, opts, cb) => opts.all ? cb(null, [{ address: "127.0.0.1", family: 4 }]) : cb(null, "127.0.0.1", 4),
    }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => { body += c; });
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    req.on("timeout", () => req.destroy(new Error(`${u}: timed out`)));
    req.on("error", reject);
    req.end();
  });
}

const send = (cmd) => client.send(cmd);
const name = `sdk-${Date.now()}`;
const role = "arn:aws:iam::123456789012:role/kiln-build";
const vmGone = (o) => o.state === "TERMINATED" || o.state === "TERMINATING";

// Managed base images.
const managed = await send(new sdk.ListManagedMicrovmImagesCommand({}));
ok(managed.items.length >= 1, "a managed image");
const baseImageArn = managed.items[0].imageArn;
const mv = await send(new sdk.ListManagedMicrovmImageVersionsCommand({ imageIdentifier: baseImageArn }));
ok(mv.items[0].status === "AVAILABLE", "managed version available");

// Create an image (a real build: the Dockerfile runs, the app starts and is
// snapshotted) and wait until it is CREATED.
const created = await send(new sdk.CreateMicrovmImageCommand({
  name, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI },
  hooks: { port: 9000, microvmHooks: { run: "ENABLED", runTimeoutInSeconds: 10 } },
  environmentVariables: { GREETING: "hi" },
  tags: { suite: "sdk" },
}));
ok(created.$metadata.httpStatusCode === 201, "CreateMicrovmImage is 201");
ok(created.state === "CREATING" && created.imageVersion === "1.0", "image CREATING version 1.0 (AWS names versions major.minor)");
ok(created.createdAt instanceof Date && !isNaN(created.createdAt), "createdAt is a Date");
const getImage = () => send(new sdk.GetMicrovmImageCommand({ imageIdentifier: name }));
const imageFailed = (o) => o.state.endsWith("FAILED");
const image = await waitFor("image CREATED", getImage, (o) => o.state === "CREATED", 150000, imageFailed);
step("image CREATED");
ok(image.latestActiveImageVersion === "1.0" && image.tags.suite === "sdk", "image CREATED with tags");
const byArn = await send(new sdk.GetMicrovmImageCommand({ imageIdentifier: created.imageArn }));
ok(byArn.name === name, "image by ARN");

const version = await send(new sdk.GetMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "1.0" }));
ok(version.state === "SUCCESSFUL" && version.status === "ACTIVE" && version.environmentVariables.GREETING === "hi", "version SUCCESSFUL");
const builds = await send(new sdk.ListMicrovmImageBuildsCommand({ imageIdentifier: name, imageVersion: "1" }));
ok(builds.items.length === 1, "one build");
const build = await send(new sdk.GetMicrovmImageBuildCommand({ imageIdentifier: name, imageVersion: "1", buildId: builds.items[0].buildId }));
ok(build.buildState === "SUCCESSFUL", "build SUCCESSFUL");
const images = await send(new sdk.ListMicrovmImagesCommand({ nameFilter: name }));
ok(images.items.length === 1 && images.items[0].name === name, "ListMicrovmImages");

// Start the second version's build now: it runs while the microVMs below
// do their work.
// Version 2 asks for 4096 MiB, a size that comes with 2 vCPUs (AWS: 0.25
// vCPU per 512 MiB); version 1 has the default 2048 MiB and 1 vCPU.
const upd = await send(new sdk.UpdateMicrovmImageCommand({ imageIdentifier: name, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI_2 }, environmentVariables: { GREETING: "hi" }, description: "v2",
  cpuConfigurations: [{ architecture: build.architecture }], resources: [{ minimumMemoryInMiB: 4096 }] }));
ok(upd.imageVersion === "2.0", "UpdateMicrovmImage 2.0");

// Run a microVM and take it through its states.
const payload = JSON.stringify({ task: "e2e" });
const run = await send(new sdk.RunMicrovmCommand({
  imageIdentifier: created.imageArn, imageVersion: "1",
  idlePolicy: { maxIdleDurationSeconds: 600, suspendedDurationSeconds: 600, autoResumeEnabled: true },
  runHookPayload: payload,
  ingressNetworkConnectors: ["ALL_INGRESS", "SHELL_INGRESS"].map((c) => `arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:${c}`),
  maximumDurationInSeconds: 3600,
  executionRoleArn: process.env.KILN_ROLE_ARN,
}));
ok(run.state === "PENDING" && run.endpoint.startsWith(`https://${run.microvmId}.`), "RunMicrovm PENDING with endpoint");
const id = run.microvmId;
const get = () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: id }));
const running = await waitFor("RUNNING", get, (o) => o.state === "RUNNING", 60000, vmGone);
step("microVM RUNNING");
ok(running.idlePolicy.maxIdleDurationSeconds === 600 && running.startedAt instanceof Date, "GetMicrovm");
const arn = created.imageArn.replace(/microvm-image:.*/, `microvm:${id}`);
ok((await send(new sdk.GetMicrovmCommand({ microvmIdentifier: arn }))).microvmId === id, "GetMicrovm by ARN");

// The endpoint: refused without a token, served with one.
const tok = await send(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 10, allowedPorts: [{ port: 8080 }, { range: { startPort: 3000, endPort: 3010 } }] }));
ok(typeof tok.authToken["X-aws-proxy-auth"] === "string", "auth token");
const auth = tok.authToken;
ok((await fetchEndpoint(run.endpoint, "/hello")).status === 401, "endpoint refuses a request without a token");
let r = await fetchEndpoint(run.endpoint, "/hello", auth);
ok(r.status === 200 && r.body === "hello hi from v1", `endpoint answers: ${r.status} ${r.body}`);
r = await fetchEndpoint(run.endpoint, "/size", auth);
ok(r.status === 200 && r.body.startsWith("cpus=1 "), `a 2048 MiB microVM has 1 vCPU: ${r.body}`);
r = await fetchEndpoint(run.endpoint, "/payload", auth);
ok(r.body === payload, `run hook got the payload: ${r.body}`);
r = await fetchEndpoint(run.endpoint, "/count", auth);
ok(r.body === "count=1", `first count: ${r.body}`);
ok((await fetchEndpoint(run.endpoint, "/hello", { ...auth, "X-aws-proxy-port": "8081" })).status === 403, "token does not grant port 8081");
step("endpoint served");

// executionRoleArn: inside the VM, the IMDSv2 flow at 169.254.169.254
// gives the role's credentials; a GET without a token is refused. The Go
// side signs a request to the S3 store with them.
r = await fetchEndpoint(run.endpoint, "/imds", auth);
const md = JSON.parse(r.body);
ok(md.V1Status === 401, `IMDSv1 GET refused: ${r.body}`);
ok(md.ListStatus === 200 && md.Role === process.env.KILN_ROLE_ARN.split("/").pop(), `role listed: ${r.body}`);
ok(md.Creds?.Code === "Success" && md.Creds.AccessKeyId && md.Creds.SecretAccessKey, `role credentials: ${md.Err ?? ""}`);
ok(Date.parse(md.Creds.Expiration) > Date.now() + 60000, `credentials expire later: ${md.Creds.Expiration}`);
writeFileSync(process.env.KILN_IMDS_OUT, JSON.stringify(md.Creds));
step("metadata service gave the role's credentials");

await send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: id }));
await waitFor("SUSPENDED", get, (o) => o.state === "SUSPENDED", 60000, vmGone);
step("microVM SUSPENDED");
checks++;
await expectError("ConflictException", 409, () => send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: id })));
await send(new sdk.ResumeMicrovmCommand({ microvmIdentifier: id }));
await waitFor("RUNNING again", get, (o) => o.state === "RUNNING", 60000, vmGone);
step("microVM resumed");
checks++;
r = await fetchEndpoint(run.endpoint, "/count", auth);
ok(r.body === "count=2", `the app kept its memory across suspend and resume: ${r.body}`);

// autoResumeEnabled: a request to a suspended microVM's endpoint resumes it.
await send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: id }));
await waitFor("SUSPENDED again", get, (o) => o.state === "SUSPENDED", 60000, vmGone);
r = await fetchEndpoint(run.endpoint, "/count", auth);
ok(r.status === 200 && r.body === "count=3", `a request resumed the microVM: ${r.status} ${r.body}`);
ok((await get()).state === "RUNNING", "RUNNING after the request");
step("auto-resumed by a request");

const shell = await send(new sdk.CreateMicrovmShellAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 5 }));
ok(Object.keys(shell.authToken).length > 0, "shell token");

// Idempotent run: the same token gives the same microVM. (This one is
// terminated as soon as it is suspended: suspendedDurationSeconds 0.)
const token = `tok-${Date.now()}`;
const runNoSuspend = { imageIdentifier: name, clientToken: token, maximumDurationInSeconds: 600,
  idlePolicy: { maxIdleDurationSeconds: 60, suspendedDurationSeconds: 0, autoResumeEnabled: false } };
const r1 = await send(new sdk.RunMicrovmCommand(runNoSuspend));
const r2 = await send(new sdk.RunMicrovmCommand(runNoSuspend));
ok(r1.microvmId === r2.microvmId, "same clientToken, same microVM");
await expectError("ConflictException", 409, () => send(new sdk.RunMicrovmCommand({ ...runNoSuspend, maximumDurationInSeconds: 601 })));

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
// Validation comes first, from the model, before any lookup: a bad input
// for a resource that does not exist is a ValidationException, not a 404.
await expectError("ValidationException", 400, () => send(new sdk.UpdateMicrovmImageVersionCommand({ imageIdentifier: "no-such-image", imageVersion: "1", status: "RETIRED" })),
  "1 validation error detected: Value 'RETIRED' at 'status' failed to satisfy constraint: Member must satisfy enum value set: [ACTIVE, INACTIVE]");
await expectError("ValidationException", 400, () => send(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: "mvm-doesnotexist", expirationInMinutes: 61, allowedPorts: [] })),
  "2 validation errors detected");
await expectError("ValidationException", 400, () => send(new sdk.CreateMicrovmShellAuthTokenCommand({ microvmIdentifier: "mvm-doesnotexist", expirationInMinutes: 0 })), "expirationInMinutes");
await expectError("ValidationException", 400, () => send(new sdk.ListMicrovmImageBuildsCommand({ imageIdentifier: "no-such-image", imageVersion: "1", maxResults: 51 })), "maxResults");
await expectError("ValidationException", 400, () => send(new sdk.UpdateMicrovmImageCommand({ imageIdentifier: "no-such-image", baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI }, description: "d".repeat(257) })), "at 'description'");
await expectError("ValidationException", 400, () => send(new sdk.ListMicrovmImageVersionsCommand({ imageIdentifier: "no-such-image", nextToken: "t".repeat(1025) })), "nextToken");
// Sizes AWS does not offer, and another architecture than the host's.
await expectError("ValidationException", 400, () => send(new sdk.CreateMicrovmImageCommand({ name: `${name}-m`, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI }, resources: [{ minimumMemoryInMiB: 3000 }] })), "Member must satisfy enum value set: [512, 1024, 2048, 4096, 8192]");
const otherArch = build.architecture === "X86_64" ? "ARM_64" : "X86_64";
await expectError("ValidationException", 400, () => send(new sdk.CreateMicrovmImageCommand({ name: `${name}-a`, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_CODE_URI }, cpuConfigurations: [{ architecture: otherArch }] })), `builds and runs only ${build.architecture}`);
// Lists: a filter applies before paging; a malformed image identifier is
// refused.
const noBuilds = await send(new sdk.ListMicrovmImageBuildsCommand({ imageIdentifier: name, imageVersion: "1", architecture: otherArch, maxResults: 1 }));
ok(noBuilds.items.length === 0 && !noBuilds.nextToken, "no builds of another architecture, and no nextToken");
const hostBuilds = await send(new sdk.ListMicrovmImageBuildsCommand({ imageIdentifier: name, imageVersion: "1", architecture: build.architecture, maxResults: 1 }));
ok(hostBuilds.items.length === 1, "the host architecture's build");
await expectError("ValidationException", 400, () => send(new sdk.ListMicrovmsCommand({ imageIdentifier: "arn:aws:lambda:bogus" })), "imageIdentifier");
await expectError("ResourceNotFoundException", 404, () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: "mvm-doesnotexist" })));
await expectError("ResourceNotFoundException", 404, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: "no-such-image" })));
await expectError("ValidationException", 400, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: name, idlePolicy: { maxIdleDurationSeconds: 10, suspendedDurationSeconds: 0, autoResumeEnabled: true } })), "maxIdleDurationSeconds");
await expectError("ValidationException", 400, () => send(new sdk.RunMicrovmCommand({ imageIdentifier: name, maximumDurationInSeconds: 28801 })), "maximumDurationInSeconds");
const bad = new sdk.LambdaMicrovmsClient({ maxAttempts: 1, credentials: { accessKeyId: (await client.config.credentials()).accessKeyId, secretAccessKey: "wrong" } });
await expectError("AccessDeniedException", 403, () => bad.send(new sdk.ListMicrovmsCommand({})), "signature");

// Another account (tenant) sees none of it: to it the resources do not
// exist, and it may not build from the host's files.
const tenant = new sdk.LambdaMicrovmsClient({ maxAttempts: 1, credentials: { accessKeyId: process.env.KILN_TENANT_KEY_ID, secretAccessKey: process.env.KILN_TENANT_SECRET } });
const tsend = (cmd) => tenant.send(cmd);
ok((await tsend(new sdk.ListMicrovmsCommand({}))).items.length === 0, "a tenant lists none of another account's microVMs");
ok((await tsend(new sdk.ListMicrovmImagesCommand({}))).items.length === 0, "a tenant lists none of another account's images");
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.GetMicrovmCommand({ microvmIdentifier: id })));
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.GetMicrovmCommand({ microvmIdentifier: arn })));
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.GetMicrovmImageCommand({ imageIdentifier: created.imageArn })));
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 5, allowedPorts: [{ port: 8080 }] })));
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.TerminateMicrovmCommand({ microvmIdentifier: id })));
await expectError("ResourceNotFoundException", 404, () => tsend(new sdk.ListTagsCommand({ Resource: arn })));
await expectError("ValidationException", 400, () => tsend(new sdk.CreateMicrovmImageCommand({ name: `${name}-t`, baseImageArn, buildRoleArn: role,
  codeArtifact: { uri: process.env.KILN_HOST_CODE_URI } })), "uploaded");
ok((await get()).state === "RUNNING", "the tenant changed nothing");

// The second microVM must have come up too (it shares the template).
const get1 = () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: r1.microvmId }));
await waitFor("second microVM RUNNING", get1, (o) => o.state === "RUNNING", 60000, vmGone);
checks++;
// A microVM without a role: its metadata service has no credentials.
const tok1 = await send(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: r1.microvmId, expirationInMinutes: 5, allowedPorts: [{ port: 8080 }] }));
r = await fetchEndpoint(r1.endpoint, "/imds", tok1.authToken);
const md1 = JSON.parse(r.body);
ok(md1.V1Status === 401 && md1.ListStatus === 404 && !md1.Creds, `no role, no credentials: ${r.body}`);

// Terminate; suspending the second one terminates it
// (suspendedDurationSeconds 0).
await send(new sdk.TerminateMicrovmCommand({ microvmIdentifier: id }));
await send(new sdk.SuspendMicrovmCommand({ microvmIdentifier: r1.microvmId }));
const term = await waitFor("TERMINATED", get, (o) => o.state === "TERMINATED", 60000);
ok(term.terminatedAt instanceof Date && term.stateReason.startsWith("UserRequested"), `terminated with reason: ${term.stateReason}`);
ok(/^[0-9a-f-]{36}$/.test(term.$metadata.requestId), "request id");
const term1 = await waitFor("suspended microVM TERMINATED", get1, (o) => o.state === "TERMINATED", 60000);
ok(term1.stateReason.startsWith("SuspendedDurationExceeded"), `suspendedDurationSeconds 0 terminates at suspend: ${term1.stateReason}`);
ok((await fetchEndpoint(run.endpoint, "/hello", auth)).status >= 400, "a terminated microVM's endpoint refuses");
await expectError("ConflictException", 409, () => send(new sdk.ResumeMicrovmCommand({ microvmIdentifier: id })));
step("microVMs TERMINATED");

// Version 2: built meanwhile; a microVM of it runs the new code.
await waitFor("image UPDATED", getImage, (o) => o.state === "UPDATED", 150000, imageFailed);
step("image UPDATED");
const vs = await send(new sdk.ListMicrovmImageVersionsCommand({ imageIdentifier: name }));
ok(vs.items.length === 2, "two versions");
// It lives 10 s: maximumDurationInSeconds is enforced.
const run2 = await send(new sdk.RunMicrovmCommand({ imageIdentifier: name, maximumDurationInSeconds: 10 }));
const get2 = () => send(new sdk.GetMicrovmCommand({ microvmIdentifier: run2.microvmId }));
const running2 = await waitFor("v2 microVM RUNNING", get2, (o) => o.state === "RUNNING", 60000, vmGone);
ok(running2.imageVersion === "2.0", `latest version runs: ${running2.imageVersion}`);
const tok2 = await send(new sdk.CreateMicrovmAuthTokenCommand({ microvmIdentifier: run2.microvmId, expirationInMinutes: 5, allowedPorts: [{ port: 8080 }] }));
r = await fetchEndpoint(run2.endpoint, "/hello", tok2.authToken);
ok(r.status === 200 && r.body === "hello hi from v2", `v2 endpoint answers: ${r.status} ${r.body}`);
r = await fetchEndpoint(run2.endpoint, "/size", tok2.authToken);
const kb = Number(r.body.split("memkb=")[1]);
ok(r.body.startsWith("cpus=2 ") && kb > 3500 * 1024 && kb <= 4096 * 1024, `a 4096 MiB microVM has 2 vCPUs and its memory: ${r.body}`);
ok((await fetchEndpoint(run2.endpoint, "/hello", auth)).status === 403, "a token of another microVM does not open this one");
const term2 = await waitFor("v2 microVM TERMINATED at its deadline", get2, (o) => o.state === "TERMINATED", 60000);
ok(term2.stateReason.startsWith("MaximumDurationExceeded"), `terminated at maximumDurationInSeconds: ${term2.stateReason}`);
step("v2 microVM TERMINATED at its deadline");

// Deactivate and delete version 2; then the image.
const inactive = await send(new sdk.UpdateMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "2.0", status: "INACTIVE" }));
ok(inactive.status === "INACTIVE", "version INACTIVE");
const dv = await send(new sdk.DeleteMicrovmImageVersionCommand({ imageIdentifier: name, imageVersion: "2.0" }));
ok(dv.state === "DELETED", "version deleted");
const di = await send(new sdk.DeleteMicrovmImageCommand({ imageIdentifier: name }));
ok(di.state === "DELETED", "image deleted");
await expectError("ResourceNotFoundException", 404, () => send(new sdk.GetMicrovmImageCommand({ imageIdentifier: name })));

console.log(`OK ${checks} checks in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
