import { useEffect, useRef, useState } from "preact/hooks";
import { APIError } from "./api";

// ErrorBanner shows an API error as the API words it.
export function ErrorBanner(props: { err: unknown }) {
  const e = props.err;
  if (!e) return null;
  const text = e instanceof APIError ? `${e.type}: ${e.message}` : e instanceof Error ? e.message : String(e);
  return <p class="error" role="alert">{text}</p>;
}

// usePoll calls f now and every ms while the component lives.
export function usePoll(f: () => Promise<void> | void, ms: number, deps: unknown[]) {
  const ref = useRef(f);
  ref.current = f;
  useEffect(() => {
    let stop = false;
    let timer = 0;
    const tick = async () => {
      try {
        await ref.current();
      } finally {
        if (!stop) timer = window.setTimeout(tick, ms);
      }
    };
    tick();
    return () => {
      stop = true;
      clearTimeout(timer);
    };
  }, deps);
}

// LogView tails a log: fetch(offset) returns new text, the next offset and
// whether more may come; it polls until the log is finished.
export function LogView(props: { label: string; fetch: (offset: number) => Promise<{ log: string; nextOffset: number; done: boolean }> }) {
  const [text, setText] = useState("");
  const [done, setDone] = useState(false);
  const [err, setErr] = useState<unknown>(null);
  const pre = useRef<HTMLPreElement>(null);
  useEffect(() => {
    let stop = false;
    let offset = 0;
    let buf = "";
    const loop = async () => {
      while (!stop) {
        try {
          const r = await props.fetch(offset);
          offset = r.nextOffset;
          if (r.log) {
            buf = (buf + r.log).slice(-512 * 1024);
            setText(buf);
          }
          if (r.done && !r.log) {
            setDone(true);
            return;
          }
          setErr(null);
          if (r.log) continue;
        } catch (x) {
          setErr(x);
        }
        await new Promise((res) => setTimeout(res, 1000));
      }
    };
    loop();
    return () => {
      stop = true;
    };
  }, [props.label]);
  useEffect(() => {
    if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text]);
  return (
    <section class="log" aria-label={props.label}>
      <h3>
        {props.label} {done ? <span class="badge">complete</span> : <span class="badge live" role="status">streaming…</span>}
      </h3>
      <pre ref={pre} tabIndex={0} aria-live="polite" data-testid="log">{text || "(no output yet)"}</pre>
      <ErrorBanner err={err} />
    </section>
  );
}

export function StateBadge(props: { state: string }) {
  return <span class={"state s-" + props.state.toLowerCase()}>{props.state}</span>;
}

export function when(t?: number | string) {
  if (t === undefined || t === null || t === "") return "";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return d.toLocaleString();
}

export function duration(s: number) {
  if (s <= 0) return "0s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

// keyValues parses "KEY=VALUE" lines.
export function keyValues(text: string): Record<string, string> | undefined {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const l = line.trim();
    if (!l) continue;
    const i = l.indexOf("=");
    if (i < 1) throw new Error(`"${l}" is not KEY=VALUE`);
    out[l.slice(0, i)] = l.slice(i + 1);
  }
  return Object.keys(out).length ? out : undefined;
}
