import { useState } from "preact/hooks";
import { usage } from "./api";
import type { Scope } from "./main";
import { ErrorBanner, StateBadge, usePoll, when } from "./ui";

export function UsagePage(props: { scope: Scope }) {
  const [u, setU] = useState<any>(null);
  const [info, setInfo] = useState<any>(null);
  const [err, setErr] = useState<unknown>(null);
  usePoll(async () => {
    try {
      setU(await usage());
      setInfo(await (await fetch("/kiln/v1/info")).json());
      setErr(null);
    } catch (x) {
      setErr(x);
    }
  }, 5000, []);
  const states = ["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING", "TERMINATED"];
  return (
    <>
      <h1>Usage and health</h1>
      <ErrorBanner err={err} />
      {!u ? <p role="status"><progress aria-label="Loading usage" /> Loading…</p> : (
        <>
          <div class="cards">
            <section class="card" aria-label="MicroVMs by state">
              <h2>MicroVMs by state</h2>
              <dl>{states.map((s) => <><dt><StateBadge state={s} /></dt><dd>{u.microvmsByState[s] || 0}</dd></>)}</dl>
            </section>
            <section class="card" aria-label="Memory committed">
              <h2>Memory committed</h2>
              <p><strong>{u.memoryCommittedMiB} MiB</strong>{u.hostMemoryMiB ? ` of ${u.hostMemoryMiB} MiB on this host` : ""}</p>
              {u.hostMemoryMiB > 0 && <meter min={0} max={u.hostMemoryMiB} high={u.hostMemoryMiB * 0.8} value={u.memoryCommittedMiB} aria-label="Memory committed against the host's memory" />}
              <p class="reason">Running, starting and suspending microVMs, at their template's memory (2048 MiB unless the image asks for a size).</p>
            </section>
            <section class="card" aria-label="Host">
              <h2>Host</h2>
              {info && <p>Accelerator <strong>{info.accel || "none"}</strong>{info.isolation ? ` — ${info.isolation}` : ""}</p>}
              {props.scope.session.operator && <p>You are the operator: you see every account.</p>}
            </section>
          </div>
          <h2>Per account</h2>
          <div class="scroll">
            <table aria-label="Usage per account" class="cards-narrow">
              <thead><tr><th scope="col">Account</th><th scope="col">Running</th><th scope="col">Suspended</th><th scope="col">Memory (MiB)</th><th scope="col">Images</th><th scope="col">Builds</th><th scope="col">Failed builds</th></tr></thead>
              <tbody>
                {u.accounts.map((a: any) => (
                  <tr><td data-label="Account">{a.account}</td><td data-label="Running">{a.microvmsByState.RUNNING || 0}</td><td data-label="Suspended">{a.microvmsByState.SUSPENDED || 0}</td><td data-label="Memory (MiB)">{a.memoryCommittedMiB}</td><td data-label="Images">{a.images}</td><td data-label="Builds">{a.builds}</td><td data-label="Failed builds">{a.failedBuilds}</td></tr>
                ))}
              </tbody>
            </table>
          </div>
          <h2>Recent builds</h2>
          <Builds label="Recent builds" list={u.recentBuilds} />
          <h2>Recent failures</h2>
          <Builds label="Recent failures" list={u.recentFailures} />
          {u.truncated && <p class="note">Some accounts have more records than this page reads; figures are partial.</p>}
        </>
      )}
    </>
  );
}

function Builds(props: { label: string; list: any[] }) {
  if (!props.list.length) return <p>None.</p>;
  return (
    <div class="scroll">
      <table aria-label={props.label} class="cards-narrow">
        <thead><tr><th scope="col">Account</th><th scope="col">Image</th><th scope="col">Version</th><th scope="col">State</th><th scope="col">Started</th><th scope="col">Reason</th></tr></thead>
        <tbody>
          {props.list.map((b) => (
            <tr><td data-label="Account">{b.account}</td><td data-label="Image">{b.image}</td><td data-label="Version">{b.version}</td><td data-label="State"><StateBadge state={b.buildState} /></td><td data-label="Started">{when(b.createdAt)}</td><td data-label="Reason" class="reason">{b.stateReason}</td></tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
