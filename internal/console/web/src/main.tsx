import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { APIError, Session, aws, onSignedOutDo, setSession, signIn, signOut, whoAmI } from "./api";
import { ImagesPage } from "./images";
import { MicrovmsPage } from "./microvms";
import { UsagePage } from "./usage";
import { ErrorBanner } from "./ui";

// Scope is what the lists show: the operator picks one account or all of
// them; a tenant always sees its own.
export interface Scope {
  session: Session;
  accounts: string[]; // accounts the lists cover
  showAccount: boolean; // more than one account: show the column
}

function route(): string {
  const h = location.hash.replace(/^#\/?/, "");
  return ["images", "microvms", "usage"].includes(h) ? h : "microvms";
}

function SignIn(props: { onIn: (s: Session) => void; why: string }) {
  const [id, setId] = useState("");
  const [secret, setSecret] = useState("");
  const [err, setErr] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setErr(null);
    try {
      props.onIn(await signIn(id.trim(), secret.trim()));
    } catch (x) {
      setErr(x);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main class="signin">
      <h1>kiln console</h1>
      <p>Sign in with an access key (as in the credentials file, e.g. <code>/var/lib/kiln/credentials</code>).</p>
      {props.why && <p class="note" role="status">{props.why}</p>}
      <form onSubmit={submit} aria-label="Sign in">
        <label>
          Access key ID
          <input name="accessKeyId" autocomplete="username" required value={id} onInput={(e) => setId(e.currentTarget.value)} />
        </label>
        <label>
          Secret access key
          <input name="secretAccessKey" type="password" autocomplete="current-password" required value={secret} onInput={(e) => setSecret(e.currentTarget.value)} />
        </label>
        <button type="submit" disabled={busy}>{busy ? "Signing in…" : "Sign in"}</button>
      </form>
      <ErrorBanner err={err} />
    </main>
  );
}

function App() {
  const [session, setS] = useState<Session | null | undefined>(undefined);
  const [why, setWhy] = useState("");
  const [page, setPage] = useState(route());
  const [pick, setPick] = useState(""); // operator: "" = all accounts
  const use = (s: Session | null) => {
    setSession(s);
    setS(s);
  };
  useEffect(() => {
    onSignedOutDo((msg) => {
      setWhy(msg);
      use(null);
    });
    whoAmI().then(use, () => use(null));
    const f = () => setPage(route());
    addEventListener("hashchange", f);
    return () => removeEventListener("hashchange", f);
  }, []);
  if (session === undefined) return <p class="loading" role="status">Loading…</p>;
  if (session === null) return <SignIn onIn={(s) => { setWhy(""); use(s); }} why={why} />;
  const accounts = session.operator ? (pick ? [pick] : session.accounts || [session.account]) : [session.account];
  const scope: Scope = { session, accounts, showAccount: accounts.length > 1 || accounts[0] !== session.account };
  const out = async () => {
    try {
      await signOut();
    } catch (x) {
      if (!(x instanceof APIError && x.status === 401)) throw x;
    }
    setWhy("Signed out.");
    use(null);
  };
  const nav = [["microvms", "MicroVMs"], ["images", "Images"], ["usage", "Usage and health"]];
  return (
    <>
      <header class="top">
        <a class="brand" href="#/microvms">kiln</a>
        <nav aria-label="Pages">
          {nav.map(([k, label]) => (
            <a href={"#/" + k} aria-current={page === k ? "page" : undefined}>{label}</a>
          ))}
        </nav>
        <div class="who">
          {session.operator ? (
            <label>
              Account
              <select value={pick} onChange={(e) => setPick(e.currentTarget.value)}>
                <option value="">All accounts (operator)</option>
                {(session.accounts || []).map((a) => <option value={a}>{a}{a === session.account ? " (you)" : ""}</option>)}
              </select>
            </label>
          ) : (
            <span>Account <strong>{session.account}</strong></span>
          )}
          <button type="button" class="secondary" onClick={out}>Sign out</button>
        </div>
      </header>
      <main id="main">
        {page === "images" && <ImagesPage scope={scope} />}
        {page === "microvms" && <MicrovmsPage scope={scope} />}
        {page === "usage" && <UsagePage scope={scope} />}
      </main>
    </>
  );
}

// Used by pages: the account a resource of `account` is acted on in.
export const asAccount = (scope: Scope, account: string) => (account === scope.session.account ? undefined : account);
export { aws };

render(<App />, document.getElementById("root")!);
