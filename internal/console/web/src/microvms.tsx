import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { V, aws, enc } from "./api";
import { listImages } from "./images";
import type { Scope } from "./main";
import { ErrorBanner, LogView, StateBadge, duration, usePoll, when } from "./ui";

const CONN = (region: string, name: string) => `arn:aws:lambda:${region}:aws:network-connector:aws-network-connector:${name}`;
const acctOf = (scope: Scope, account: string) => (account === scope.session.account ? undefined : account);

interface Vm {
  account: string;
  microvmId: string;
  state: string;
  imageArn: string;
  imageVersion: string;
  startedAt?: number;
  endpoint?: string;
  idlePolicy?: { maxIdleDurationSeconds: number; suspendedDurationSeconds: number; autoResumeEnabled: boolean };
  maximumDurationInSeconds?: number;
  ingressNetworkConnectors?: string[];
  stateReason?: string;
}

const imageName = (arn: string) => arn.split(":").pop()?.replace(/^microvm-image\//, "") || arn;

function RunForm(props: { scope: Scope; onRun: () => void }) {
  const { scope } = props;
  const [images, setImages] = useState<any[]>([]);
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<unknown>(null);
  usePoll(async () => {
    try {
      setImages((await listImages(scope)).filter((i) => i.latestActiveImageVersion));
    } catch (x) {
      setErr(x);
    }
  }, 5000, [scope.accounts.join()]);
  const submit = async (e: Event) => {
    e.preventDefault();
    const f = e.currentTarget as HTMLFormElement;
    const v = (n: string) => ((f.elements.namedItem(n) as HTMLInputElement).value || "").trim();
    const checked = (n: string) => (f.elements.namedItem(n) as HTMLInputElement).checked;
    setErr(null);
    setBusy(true);
    try {
      const [account, name] = v("image").split("/");
      const region = "us-east-1";
      const body: any = { imageIdentifier: name, maximumDurationInSeconds: Number(v("maxDuration")) };
      if (v("version")) body.imageVersion = v("version");
      if (checked("idle")) {
        body.idlePolicy = { maxIdleDurationSeconds: Number(v("maxIdle")), suspendedDurationSeconds: Number(v("suspended")), autoResumeEnabled: checked("autoResume") };
      }
      const ingress = [];
      if (checked("allIngress")) ingress.push(CONN(region, "ALL_INGRESS"));
      if (checked("shellIngress")) ingress.push(CONN(region, "SHELL_INGRESS"));
      if (ingress.length) body.ingressNetworkConnectors = ingress;
      if (checked("egress")) body.egressNetworkConnectors = [CONN(region, "INTERNET_EGRESS")];
      if (v("payload")) body.runHookPayload = v("payload");
      await aws.post(V + "/microvms", body, acctOf(scope, account));
      props.onRun();
    } catch (x) {
      setErr(x);
    } finally {
      setBusy(false);
    }
  };
  return (
    <details class="panel">
      <summary>Run a microVM</summary>
      <form onSubmit={submit} aria-label="Run a microVM" class="grid">
        <label>Image
          <select name="image" required>
            {images.map((i) => <option value={i.account + "/" + i.name}>{i.name}{scope.showAccount ? ` (${i.account})` : ""}</option>)}
          </select>
        </label>
        <label>Image version<input name="version" placeholder="latest active" /></label>
        <label>Maximum duration (s)<input name="maxDuration" type="number" min={1} max={28800} value="3600" /></label>
        <fieldset>
          <legend>Idle policy</legend>
          <label class="check"><input type="checkbox" name="idle" checked />Suspend when idle</label>
          <label>Idle before suspend (s)<input name="maxIdle" type="number" min={60} value="600" /></label>
          <label>Suspended before terminate (s)<input name="suspended" type="number" min={0} value="3600" /></label>
          <label class="check"><input type="checkbox" name="autoResume" checked />Resume on traffic</label>
        </fieldset>
        <fieldset>
          <legend>Network connectors</legend>
          <label class="check"><input type="checkbox" name="allIngress" checked />ALL_INGRESS (endpoint)</label>
          <label class="check"><input type="checkbox" name="shellIngress" checked />SHELL_INGRESS (browser shell)</label>
          <label class="check"><input type="checkbox" name="egress" />INTERNET_EGRESS</label>
        </fieldset>
        <label>Run hook payload<textarea name="payload" rows={2} maxLength={16384} /></label>
        <div class="actions">
          <button type="submit" disabled={busy || images.length === 0}>Run</button>
          {busy && <span role="status"><progress aria-label="Starting" /> Starting…</span>}
          {images.length === 0 && <span>No image with an active version yet.</span>}
        </div>
      </form>
      <ErrorBanner err={err} />
    </details>
  );
}

// Shell is xterm.js over the endpoint's shell WebSocket (port 8022): the
// shell token and the port travel as subprotocols, binary frames carry
// terminal bytes, a text frame {"cols","rows"} resizes, and the close
// reason "exit N" is the exit status.
function Shell(props: { scope: Scope; vm: Vm }) {
  const { scope, vm } = props;
  const box = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState("Connecting…");
  const [err, setErr] = useState<unknown>(null);
  useEffect(() => {
    const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false, screenReaderMode: true });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(box.current!);
    fit.fit();
    let ws: WebSocket | null = null;
    let closed = false;
    const te = new TextEncoder();
    (async () => {
      try {
        const r = await aws.post(`${V}/microvms/${enc(vm.microvmId)}/shell-auth-token`, { expirationInMinutes: 60 }, acctOf(scope, vm.account));
        const at = r.authToken || {};
        const tok = Object.entries(at).find(([k]) => k.toLowerCase() === "x-aws-proxy-auth")?.[1] as string;
        const host = new URL(vm.endpoint!).host;
        ws = new WebSocket(`wss://${host}/?cols=${term.cols}&rows=${term.rows}`, ["lambda-microvms.authentication." + tok, "lambda-microvms.port.8022"]);
        ws.binaryType = "arraybuffer";
        ws.onopen = () => {
          setStatus("Connected");
          term.focus();
        };
        ws.onmessage = (m) => term.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
        ws.onclose = (c) => {
          if (!closed) setStatus(c.reason ? `Closed: ${c.reason}` : `Closed (code ${c.code})`);
        };
        ws.onerror = () => setStatus("Connection failed: is the endpoint's certificate (kiln's CA) trusted by this browser?");
      } catch (x) {
        setErr(x);
        setStatus("Not connected");
      }
    })();
    const data = term.onData((d) => ws?.readyState === WebSocket.OPEN && ws.send(te.encode(d)));
    const resize = term.onResize(({ cols, rows }) => ws?.readyState === WebSocket.OPEN && ws.send(JSON.stringify({ cols, rows })));
    const onWin = () => fit.fit();
    addEventListener("resize", onWin);
    return () => {
      closed = true;
      removeEventListener("resize", onWin);
      data.dispose();
      resize.dispose();
      ws?.close();
      term.dispose();
    };
  }, [vm.microvmId]);
  return (
    <section class="shell" aria-label={`Shell in ${vm.microvmId}`}>
      <h3>Shell in {vm.microvmId} <span class="badge" role="status">{status}</span></h3>
      <div ref={box} class="term" data-testid="terminal" />
      <ErrorBanner err={err} />
    </section>
  );
}

function remaining(vm: Vm): string {
  if (!vm.startedAt || !vm.maximumDurationInSeconds || vm.state === "TERMINATED") return "—";
  return duration(vm.startedAt + vm.maximumDurationInSeconds - Date.now() / 1000);
}

function idle(vm: Vm): string {
  const p = vm.idlePolicy;
  if (!p) return "none";
  return `suspend after ${duration(p.maxIdleDurationSeconds)} idle, end after ${duration(p.suspendedDurationSeconds)} suspended${p.autoResumeEnabled ? ", auto-resume" : ""}`;
}

export function MicrovmsPage(props: { scope: Scope }) {
  const { scope } = props;
  const [vms, setVms] = useState<Vm[] | null>(null);
  const [err, setErr] = useState<unknown>(null);
  const [filter, setFilter] = useState("");
  const [stateFilter, setStateFilter] = useState("");
  const [showEnded, setShowEnded] = useState(false);
  const [panel, setPanel] = useState<{ kind: "log" | "shell"; id: string } | null>(null);
  const [tokens, setTokens] = useState<Record<string, { url: string; token: string; expires: string }>>({});
  const [pending, setPending] = useState<Record<string, string>>({});
  const refresh = async () => {
    try {
      const all: Vm[] = [];
      for (const account of scope.accounts) {
        const r = await aws.get(V + "/microvms", acctOf(scope, account), { maxResults: "50" });
        for (const item of r.items) {
          // The list has no endpoint or idle policy: ask for the live ones.
          const full = item.state === "TERMINATED" ? item : await aws.get(`${V}/microvms/${enc(item.microvmId)}`, acctOf(scope, account)).catch(() => item);
          all.push({ ...full, account });
        }
      }
      all.sort((a, b) => (b.startedAt || 0) - (a.startedAt || 0));
      setVms(all);
      setErr(null);
    } catch (x) {
      setErr(x);
    }
  };
  usePoll(refresh, 2000, [scope.accounts.join()]);
  const act = async (vm: Vm, what: string, f: () => Promise<unknown>) => {
    setPending((p) => ({ ...p, [vm.microvmId]: what }));
    try {
      await f();
      await refresh();
    } catch (x) {
      setErr(x);
    } finally {
      setPending((p) => {
        const q = { ...p };
        delete q[vm.microvmId];
        return q;
      });
    }
  };
  const path = (vm: Vm, suffix = "") => `${V}/microvms/${enc(vm.microvmId)}${suffix}`;
  const token = (vm: Vm) =>
    act(vm, "Creating a token…", async () => {
      const r = await aws.post(path(vm, "/auth-token"), { expirationInMinutes: 60, allowedPorts: [{ port: 8080 }] }, acctOf(scope, vm.account));
      const tok = Object.entries(r.authToken || {}).find(([k]) => k.toLowerCase() === "x-aws-proxy-auth")?.[1] as string;
      const u = new URL(vm.endpoint!);
      u.searchParams.set("kiln-proxy-auth", tok);
      setTokens((t) => ({ ...t, [vm.microvmId]: { url: u.toString(), token: tok, expires: new Date(Date.now() + 3600e3).toLocaleTimeString() } }));
    });
  const shown = (vms || []).filter(
    (v) =>
      (showEnded || v.state !== "TERMINATED") &&
      (!stateFilter || v.state === stateFilter) &&
      (!filter || [v.microvmId, imageName(v.imageArn), v.state, v.account, v.endpoint].join(" ").toLowerCase().includes(filter.toLowerCase())),
  );
  const shellOn = (vm: Vm) => (vm.ingressNetworkConnectors || []).some((c) => c.endsWith(":SHELL_INGRESS"));
  const panelVm = panel && (vms || []).find((v) => v.microvmId === panel.id);
  return (
    <>
      <h1>MicroVMs</h1>
      <RunForm scope={scope} onRun={refresh} />
      <div class="filters" role="search">
        <label>Filter<input type="search" value={filter} onInput={(e) => setFilter(e.currentTarget.value)} placeholder="id, image, endpoint" /></label>
        <label>State
          <select value={stateFilter} onChange={(e) => setStateFilter(e.currentTarget.value)}>
            <option value="">any</option>
            {["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING", "TERMINATED"].map((s) => <option>{s}</option>)}
          </select>
        </label>
        <label class="check"><input type="checkbox" checked={showEnded} onChange={(e) => setShowEnded(e.currentTarget.checked)} />Show terminated</label>
      </div>
      <ErrorBanner err={err} />
      {vms === null ? <p role="status"><progress aria-label="Loading microVMs" /> Loading…</p> : (
        <div class="scroll">
          <table aria-label="MicroVMs" class="cards-narrow">
            <thead>
              <tr>{scope.showAccount && <th scope="col">Account</th>}<th scope="col">MicroVM</th><th scope="col">State</th><th scope="col">Image</th><th scope="col">Endpoint</th><th scope="col">Idle policy</th><th scope="col">Remaining</th><th scope="col">Actions</th></tr>
            </thead>
            <tbody>
              {shown.map((vm) => {
                const busy = pending[vm.microvmId];
                const live = vm.state !== "TERMINATED" && vm.state !== "TERMINATING";
                const t = tokens[vm.microvmId];
                return (
                  <tr data-microvm={vm.microvmId}>
                    {scope.showAccount && <td data-label="Account">{vm.account}</td>}
                    <td data-label="MicroVM"><code>{vm.microvmId}</code><div class="reason">{when(vm.startedAt)}</div></td>
                    <td data-label="State"><StateBadge state={vm.state} />{vm.stateReason && <div class="reason">{vm.stateReason}</div>}</td>
                    <td data-label="Image">{imageName(vm.imageArn)}:{vm.imageVersion}</td>
                    <td data-label="Endpoint" class="endpoint">{vm.endpoint || "—"}</td>
                    <td data-label="Idle policy">{idle(vm)}</td>
                    <td data-label="Remaining">{remaining(vm)}</td>
                    <td class="actions">
                      {busy && <span role="status"><progress aria-label={busy} /> {busy}</span>}
                      {vm.state === "RUNNING" && <button type="button" disabled={!!busy} onClick={() => act(vm, "Suspending…", () => aws.post(path(vm, "/suspend"), {}, acctOf(scope, vm.account)))}>Suspend</button>}
                      {vm.state === "SUSPENDED" && <button type="button" disabled={!!busy} onClick={() => act(vm, "Resuming…", () => aws.post(path(vm, "/resume"), {}, acctOf(scope, vm.account)))}>Resume</button>}
                      {live && <button type="button" disabled={!!busy} onClick={() => token(vm)}>Create auth token</button>}
                      {live && shellOn(vm) && <button type="button" onClick={() => setPanel({ kind: "shell", id: vm.microvmId })}>Shell</button>}
                      <button type="button" onClick={() => setPanel({ kind: "log", id: vm.microvmId })}>App log</button>
                      {live && <button type="button" class="danger" disabled={!!busy} onClick={() => confirm(`Terminate ${vm.microvmId}?`) && act(vm, "Terminating…", () => aws.del(path(vm), acctOf(scope, vm.account)))}>Terminate</button>}
                      {t && live && (
                        <div class="token">
                          <a href={t.url} target="_blank" rel="noopener noreferrer">Open endpoint in a new tab</a>
                          <label>Token (X-aws-proxy-auth, until {t.expires})<input readOnly value={t.token} onFocus={(e) => e.currentTarget.select()} /></label>
                        </div>
                      )}
                    </td>
                  </tr>
                );
              })}
              {shown.length === 0 && <tr><td colSpan={8}>No microVMs{filter || stateFilter ? " match the filter" : ""}.</td></tr>}
            </tbody>
          </table>
        </div>
      )}
      {panel && panelVm && (
        <div class="panel-wrap">
          <button type="button" class="secondary close" onClick={() => setPanel(null)}>Close {panel.kind === "shell" ? "shell" : "log"}</button>
          {panel.kind === "log" ? (
            <LogView
              key={"log" + panel.id}
              label={`App log of ${panel.id}`}
              fetch={async (offset) => {
                const r = await aws.get(`/kiln/v1/microvms/${enc(panel.id)}/log`, acctOf(scope, panelVm.account), { offset: String(offset) });
                return { log: r.log, nextOffset: r.nextOffset, done: r.state === "TERMINATED" };
              }}
            />
          ) : (
            <Shell key={"shell" + panel.id} scope={scope} vm={panelVm} />
          )}
        </div>
      )}
    </>
  );
}
