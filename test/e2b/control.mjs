// The control API beyond create/run/kill, with the official `e2b` SDK:
// a timeout that passes kills the sandbox, or pauses it when the sandbox
// was created with lifecycle.onTimeout "pause" (connect resumes it with its
// memory); getMetrics measures the sandbox; network rules (at create and
// updateNetwork at runtime) decide what the guest reaches outside; its
// ports are public unless made with allowPublicTraffic false.
import assert from "node:assert/strict";
import { step, rejects, until } from "./lib.mjs";
import { execFileSync, spawn } from "node:child_process";
import { Sandbox, SandboxNotFoundError, CommandExitError, SandboxError } from "e2b";

const template = process.env.KILN_TEMPLATE;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const made = [];
try {
  // The timeouts are set once the sandbox answered, so that a slow first
  // command under TCG does not race them.
  await step("a sandbox whose timeout (setTimeout) passes is killed", async () => {
    const sbx = await Sandbox.create(template, { timeoutMs: 120_000 });
    made.push(sbx);
    assert.equal((await sbx.commands.run("echo alive")).stdout, "alive\n");
    await sbx.setTimeout(2_000);
    await until("the sandbox is gone", 60_000, async () => {
      try {
        await Sandbox.getInfo(sbx.sandboxId);
        return false;
      } catch (err) {
        assert.ok(err instanceof SandboxNotFoundError, `getInfo: ${err?.constructor?.name}: ${err?.message}`);
        return true;
      }
    });
    await rejects(Sandbox.connect(sbx.sandboxId), SandboxNotFoundError, "connect to a timed-out sandbox");
    assert.equal(await Sandbox.kill(sbx.sandboxId), false);
  });

  await step("lifecycle.onTimeout pause: the timeout pauses it, connect resumes it with its memory", async () => {
    const sbx = await Sandbox.create(template, { timeoutMs: 120_000, lifecycle: { onTimeout: "pause" } });
    made.push(sbx);
    const info = await sbx.getInfo();
    assert.deepEqual(info.lifecycle, { onTimeout: "pause", autoResume: false });
    // A cold boot from the disk would give a new boot id.
    const boot = (await sbx.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout;
    await sbx.commands.run("echo kept > /mark");
    await sbx.setTimeout(2_000);
    await until("the sandbox is paused", 60_000, async () => (await Sandbox.getInfo(sbx.sandboxId)).state === "paused");
    const paused = await Sandbox.getInfo(sbx.sandboxId);
    assert.ok(paused.endAt.getTime() - Date.now() > 3_600_000, `a paused sandbox ends at ${paused.endAt.toISOString()}`);
    const again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 });
    assert.equal((await again.getInfo()).state, "running");
    assert.equal((await again.commands.run("cat /proc/sys/kernel/random/boot_id")).stdout, boot);
    assert.equal((await again.commands.run("cat /mark")).stdout, "kept\n");
  });

  await step("getMetrics: CPU, memory and disk measured on the running sandbox", async () => {
    const sbx = await Sandbox.create(template, { timeoutMs: 120_000 });
    made.push(sbx);
    const [before] = await sbx.getMetrics();
    assert.ok(before, "a running sandbox has a metric");
    assert.ok(before.cpuCount >= 1, `cpuCount ${before.cpuCount}`);
    assert.equal(before.memTotal, 512 * 1024 * 1024);
    assert.ok(before.memUsed > 0 && before.diskTotal > 0 && before.diskUsed >= 0, JSON.stringify(before));
    assert.ok(Math.abs(before.timestamp.getTime() - Date.now()) < 60_000, `timestamp ${before.timestamp.toISOString()}`);
    await sbx.commands.run("busybox dd if=/dev/urandom of=/big.bin bs=1M count=8 2>/dev/null && busybox sync");
    const busy = await sbx.commands.run("while :; do :; done", { background: true });
    try {
      await sleep(1_000);
      const [during] = await sbx.getMetrics();
      assert.ok(during.diskUsed >= before.diskUsed + 4 * 1024 * 1024, `8 MiB written: disk used ${before.diskUsed} -> ${during.diskUsed}`);
      // A loaded CI host gives a vCPU's thread a small share: a busy loop
      // still shows.
      assert.ok(during.cpuUsedPct > 5, `a busy loop runs: cpuUsedPct ${during.cpuUsedPct}`);
      console.log(`metrics: idle ${JSON.stringify(before)}, busy ${JSON.stringify(during)}`);
    } finally {
      await busy.kill();
    }
  });

  await step("ports: public by default (E2B's), allowPublicTraffic false needs the trafficAccessToken", async () => {
    const get = (sbx, headers = {}) => fetch(`${process.env.E2B_SANDBOX_URL}/hello.txt`,
      { headers: { "E2b-Sandbox-Id": sbx.sandboxId, "E2b-Sandbox-Port": "8080", ...headers } });
    const pub = await Sandbox.create(template, { timeoutMs: 120_000 });
    made.push(pub);
    assert.equal(pub.trafficAccessToken, undefined);
    await pub.files.write("/hello.txt", "public");
    let r = await get(pub);
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "public");

    const priv = await Sandbox.create(template, { timeoutMs: 120_000, network: { allowPublicTraffic: false } });
    made.push(priv);
    assert.match(priv.trafficAccessToken ?? "", /^ktt1\./);
    assert.equal((await priv.getInfo()).network?.allowPublicTraffic, false);
    await priv.files.write("/hello.txt", "private");
    assert.equal((await get(priv)).status, 401, "no traffic token");
    assert.equal((await get(priv, { "e2b-traffic-access-token": "ktt1.AAAA" })).status, 401, "a wrong traffic token");
    assert.equal((await get(priv, { "e2b-traffic-access-token": priv.envdAccessToken ?? "x" })).status, 401, "the envd token");
    r = await get(priv, { "e2b-traffic-access-token": priv.trafficAccessToken });
    assert.equal(r.status, 200);
    assert.equal(await r.text(), "private");
  });

  // A stand-in for the internet: a namespace behind a host link on
  // 192.88.99.128/28 (the deprecated 6to4 anycast block: not on kiln's
  // deny list, no one's unicast host; a /28 so it does not collide with
  // the netns tests' /24) serving HTTP on 192.88.99.129:9000.
  const ns = `kilntest-e2bnet-${process.pid}`, link = `ke2b${process.pid % 1000000}`;
  const ip = (...a) => execFileSync("ip", a, { stdio: "pipe" });
  let server;
  try {
    ip("netns", "add", ns);
    ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns);
    ip("addr", "add", "192.88.99.142/28", "dev", link);
    ip("link", "set", link, "up");
    ip("-n", ns, "addr", "add", "192.88.99.129/28", "dev", "eth0");
    ip("-n", ns, "link", "set", "eth0", "up");
    server = spawn("ip", ["netns", "exec", ns, process.execPath, "-e",
      "require('http').createServer((q, r) => r.end('outside')).listen(9000, '192.88.99.129')"], { stdio: "ignore" });
    await sleep(500);
    // busybox nc, not wget: the static wget crashes in a root without /etc.
    const fetchOutside = async (sbx) => {
      const r = await sbx.commands.run("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 192.88.99.129 9000", { timeoutMs: 30_000 });
      return { stdout: r.stdout.split("\r\n\r\n").pop() };
    };
    const blocked = async (sbx, what) => {
      const err = await rejects(fetchOutside(sbx), CommandExitError, what);
      assert.match(err.stderr, /can't connect|timed out/, `${what}: ${err.stderr}`);
    };

    await step("network rules: denyOut at create, updateNetwork at runtime, allowOut over denyOut", async () => {
      const denied = await Sandbox.create(template, { timeoutMs: 120_000, network: { denyOut: ["192.88.99.129/32"] } });
      made.push(denied);
      assert.deepEqual((await denied.getInfo()).network?.denyOut, ["192.88.99.129/32"]);
      await blocked(denied, "a destination denied at create");

      const sbx = await Sandbox.create(template, { timeoutMs: 120_000, allowInternetAccess: true });
      made.push(sbx);
      assert.equal((await fetchOutside(sbx)).stdout, "outside");
      await sbx.updateNetwork({ denyOut: ["192.88.99.128/28"] });
      await blocked(sbx, "a destination denied at runtime");
      await sbx.updateNetwork({ allowOut: ["192.88.99.129"], denyOut: ["0.0.0.0/0"] });
      assert.equal((await fetchOutside(sbx)).stdout, "outside");
      await sbx.updateNetwork({ allowInternetAccess: false });
      await blocked(sbx, "allowInternetAccess false at runtime");
      await sbx.updateNetwork({});
      assert.equal((await fetchOutside(sbx)).stdout, "outside");
      const bad = await rejects(sbx.updateNetwork({ denyOut: ["192.88.99.300/32"] }), SandboxError, "a bad CIDR");
      assert.match(bad.message, /not an IPv4 CIDR block/);
    });
  } finally {
    server?.kill();
    try { ip("link", "del", link); } catch {}
    try { ip("netns", "del", ns); } catch {}
  }
} finally {
  for (const sbx of made) await Sandbox.kill(sbx.sandboxId).catch(() => {});
}
