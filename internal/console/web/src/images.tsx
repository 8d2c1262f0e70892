import { zipSync } from "fflate";
import { useState } from "preact/hooks";
import { V, aws, enc } from "./api";
import type { Scope } from "./main";
import { ErrorBanner, LogView, StateBadge, keyValues, usePoll, when } from "./ui";

interface Image {
  account: string;
  name: string;
  imageArn: string;
  state: string;
  createdAt?: number;
  latestActiveImageVersion?: string;
  latestFailedImageVersion?: string;
}

const acctOf = (scope: Scope, account: string) => (account === scope.session.account ? undefined : account);

export async function listImages(scope: Scope): Promise<Image[]> {
  const all: Image[] = [];
  for (const account of scope.accounts) {
    let token = "";
    do {
      const r = await aws.get(V + "/microvm-images", acctOf(scope, account), { maxResults: "50", nextToken: token });
      all.push(...r.items.map((i: any) => ({ ...i, account })));
      token = r.nextToken || "";
    } while (token);
  }
  return all;
}

// zipFolder packs the files of a folder upload (their paths below the
// chosen folder); browsers do not tell file modes, so files are 0644.
async function zipFolder(files: FileList): Promise<Blob> {
  const entries: Record<string, Uint8Array> = {};
  for (const f of Array.from(files)) {
    const rel = (f as any).webkitRelativePath as string;
    const path = rel.includes("/") ? rel.slice(rel.indexOf("/") + 1) : rel;
    entries[path] = new Uint8Array(await f.arrayBuffer());
  }
  return new Blob([zipSync(entries, { level: 6 })], { type: "application/zip" });
}

function CreateImage(props: { scope: Scope; onCreated: (img: Image) => void }) {
  const { scope } = props;
  const [busy, setBusy] = useState("");
  const [err, setErr] = useState<unknown>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    const f = e.currentTarget as HTMLFormElement;
    const v = (n: string) => ((f.elements.namedItem(n) as HTMLInputElement | null)?.value || "").trim();
    const checked = (n: string) => !!(f.elements.namedItem(n) as HTMLInputElement | null)?.checked;
    setErr(null);
    try {
      const account = scope.accounts.length === 1 ? scope.accounts[0] : scope.session.account;
      const zipInput = f.elements.namedItem("zip") as HTMLInputElement;
      const dirInput = f.elements.namedItem("folder") as HTMLInputElement;
      let blob: Blob;
      if (zipInput.files && zipInput.files.length) blob = zipInput.files[0];
      else if (dirInput.files && dirInput.files.length) {
        setBusy("Packing the folder…");
        blob = await zipFolder(dirInput.files);
      } else throw new Error("choose a zip file or a folder holding the Dockerfile and the app");
      setBusy(`Uploading ${(blob.size / 1024).toFixed(0)} KiB…`);
      const up = await aws.upload(blob, acctOf(scope, account));
      const region = "us-east-1";
      const body: any = {
        name: v("name"),
        description: v("description") || undefined,
        baseImageArn: v("baseImageArn"),
        baseImageVersion: v("baseImageVersion") || undefined,
        buildRoleArn: v("buildRoleArn"),
        codeArtifact: { uri: up.uri },
        cpuConfigurations: [{ architecture: v("architecture") }],
        environmentVariables: keyValues(v("env")),
        tags: keyValues(v("tags")),
      };
      if (v("memory")) body.resources = [{ minimumMemoryInMiB: Number(v("memory")) }];
      if (checked("egress")) body.egressNetworkConnectors = [`arn:aws:lambda:${region}:aws:network-connector:aws-network-connector:INTERNET_EGRESS`];
      if (checked("allcaps")) body.additionalOsCapabilities = ["ALL"];
      const hooks: any = {};
      if (v("hookPort")) hooks.port = Number(v("hookPort"));
      const mh: any = {};
      for (const h of ["run", "resume", "suspend", "terminate"]) if (checked("hook-" + h)) mh[h] = "ENABLED";
      if (Object.keys(mh).length) hooks.microvmHooks = mh;
      const ih: any = {};
      for (const h of ["ready", "validate"]) if (checked("hook-" + h)) ih[h] = "ENABLED";
      if (Object.keys(ih).length) hooks.microvmImageHooks = ih;
      if (Object.keys(hooks).length) body.hooks = hooks;
      if (v("logging")) body.logging = JSON.parse(v("logging"));
      setBusy("Creating the image…");
      const r = await aws.post(V + "/microvm-images", body, acctOf(scope, account));
      props.onCreated({ ...r, account });
      f.reset();
    } catch (x) {
      setErr(x);
    } finally {
      setBusy("");
    }
  };
  return (
    <details class="panel">
      <summary>Create an image</summary>
      <form onSubmit={submit} aria-label="Create an image" class="grid">
        <label>Name<input name="name" required pattern="[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,127}" /></label>
        <label>Description<input name="description" maxLength={256} /></label>
        <label>Code package (zip)<input name="zip" type="file" accept=".zip,application/zip" /></label>
        <label>…or a folder<input name="folder" type="file" {...({ webkitdirectory: "", directory: "" } as any)} multiple /></label>
        <label>Base image ARN<input name="baseImageArn" required value="arn:aws:lambda:us-east-1:aws:microvm-image:debian-12" /></label>
        <label>Base image version<input name="baseImageVersion" placeholder="latest" /></label>
        <label>Build role ARN<input name="buildRoleArn" required value="arn:aws:iam::123456789012:role/build" /></label>
        <label>Architecture<select name="architecture"><option>X86_64</option><option>ARM_64</option></select></label>
        <label>Minimum memory (MiB)<input name="memory" type="number" min={128} max={32768} placeholder="512" /></label>
        <label>Hooks port<input name="hookPort" type="number" min={1} max={65535} placeholder="none" /></label>
        <fieldset>
          <legend>Hooks the app implements</legend>
          {["ready", "validate", "run", "resume", "suspend", "terminate"].map((h) => (
            <label class="check"><input type="checkbox" name={"hook-" + h} />{h}</label>
          ))}
        </fieldset>
        <fieldset>
          <legend>Build options</legend>
          <label class="check"><input type="checkbox" name="egress" />Internet egress while building</label>
          <label class="check"><input type="checkbox" name="allcaps" />All OS capabilities</label>
        </fieldset>
        <label>Environment variables (KEY=VALUE per line)<textarea name="env" rows={3} /></label>
        <label>Tags (KEY=VALUE per line)<textarea name="tags" rows={2} /></label>
        <label>Logging (JSON, optional)<textarea name="logging" rows={2} /></label>
        <div class="actions">
          <button type="submit" disabled={!!busy}>Create image</button>
          {busy && <span role="status"><progress aria-label={busy} /> {busy}</span>}
        </div>
      </form>
      <ErrorBanner err={err} />
    </details>
  );
}

function ImageDetail(props: { scope: Scope; img: Image }) {
  const { scope, img } = props;
  const [versions, setVersions] = useState<any[]>([]);
  const [builds, setBuilds] = useState<Record<string, any[]>>({});
  const [log, setLog] = useState<{ version: string; buildId: string } | null>(null);
  const [err, setErr] = useState<unknown>(null);
  const acct = acctOf(scope, img.account);
  usePoll(async () => {
    try {
      const vs = (await aws.get(`${V}/microvm-images/${enc(img.name)}/versions`, acct)).items;
      setVersions(vs);
      const bs: Record<string, any[]> = {};
      for (const v of vs) {
        bs[v.imageVersion] = (await aws.get(`${V}/microvm-images/${enc(img.name)}/versions/${enc(v.imageVersion)}/builds`, acct)).items;
      }
      setBuilds(bs);
      setErr(null);
      if (!log) {
        // Follow the newest build's log from the start.
        const last = vs[vs.length - 1];
        const b = last && bs[last.imageVersion]?.[0];
        if (b) setLog({ version: last.imageVersion, buildId: b.buildId });
      }
    } catch (x) {
      setErr(x);
    }
  }, 2000, [img.name, img.account]);
  return (
    <section class="detail" aria-label={`Image ${img.name}`}>
      <h3>Versions of {img.name}</h3>
      <table>
        <thead><tr><th scope="col">Version</th><th scope="col">State</th><th scope="col">Status</th><th scope="col">Created</th><th scope="col">Builds</th></tr></thead>
        <tbody>
          {versions.map((v) => (
            <tr>
              <td>{v.imageVersion}</td>
              <td><StateBadge state={v.state} />{v.stateReason && <div class="reason">{v.stateReason}</div>}</td>
              <td>{v.status}</td>
              <td>{when(v.createdAt)}</td>
              <td>
                {(builds[v.imageVersion] || []).map((b) => (
                  <div>
                    <StateBadge state={b.buildState} /> {b.architecture}{" "}
                    <button type="button" class="link" onClick={() => setLog({ version: v.imageVersion, buildId: b.buildId })}>
                      Build log {b.buildId}
                    </button>
                  </div>
                ))}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <ErrorBanner err={err} />
      {log && (
        <LogView
          label={`Build log of ${img.name} version ${log.version}`}
          fetch={async (offset) => {
            const r = await aws.get(`/kiln/v1/microvm-images/${enc(img.name)}/versions/${enc(log.version)}/builds/${enc(log.buildId)}/log`, acct, { offset: String(offset) });
            return { log: r.log, nextOffset: r.nextOffset, done: r.buildState === "SUCCESSFUL" || r.buildState === "FAILED" };
          }}
        />
      )}
    </section>
  );
}

export function ImagesPage(props: { scope: Scope }) {
  const { scope } = props;
  const [images, setImages] = useState<Image[] | null>(null);
  const [open, setOpen] = useState<string>("");
  const [err, setErr] = useState<unknown>(null);
  const [filter, setFilter] = useState("");
  const refresh = async () => {
    try {
      setImages(await listImages(scope));
      setErr(null);
    } catch (x) {
      setErr(x);
    }
  };
  usePoll(refresh, 3000, [scope.accounts.join()]);
  const del = async (img: Image) => {
    if (!confirm(`Delete image ${img.name} and all its versions?`)) return;
    try {
      await aws.del(`${V}/microvm-images/${enc(img.name)}`, acctOf(scope, img.account));
      refresh();
    } catch (x) {
      setErr(x);
    }
  };
  const key = (i: Image) => i.account + "/" + i.name;
  const shown = (images || []).filter((i) => !filter || (i.name + " " + i.state + " " + i.account).toLowerCase().includes(filter.toLowerCase()));
  const openImg = shown.find((i) => key(i) === open);
  return (
    <>
      <h1>Images</h1>
      <CreateImage scope={scope} onCreated={(img) => { setOpen(key(img)); refresh(); }} />
      <label class="filter">Filter<input type="search" value={filter} onInput={(e) => setFilter(e.currentTarget.value)} /></label>
      <ErrorBanner err={err} />
      {images === null ? <p role="status"><progress aria-label="Loading images" /> Loading…</p> : (
        <div class="scroll">
          <table aria-label="Images" class="cards-narrow">
            <thead><tr>{scope.showAccount && <th scope="col">Account</th>}<th scope="col">Name</th><th scope="col">State</th><th scope="col">Active version</th><th scope="col">Created</th><th scope="col">Actions</th></tr></thead>
            <tbody>
              {shown.map((i) => (
                <tr data-image={i.name}>
                  {scope.showAccount && <td data-label="Account">{i.account}</td>}
                  <td data-label="Name">{i.name}</td>
                  <td data-label="State"><StateBadge state={i.state} />{(i.state === "CREATING" || i.state === "UPDATING") && <progress aria-label={`Building ${i.name}`} />}</td>
                  <td data-label="Active version">{i.latestActiveImageVersion || "—"}</td>
                  <td data-label="Created">{when(i.createdAt)}</td>
                  <td class="actions">
                    <button type="button" aria-expanded={open === key(i)} onClick={() => setOpen(open === key(i) ? "" : key(i))}>Versions and builds</button>
                    <button type="button" class="danger" onClick={() => del(i)}>Delete</button>
                  </td>
                </tr>
              ))}
              {shown.length === 0 && <tr><td colSpan={6}>No images.</td></tr>}
            </tbody>
          </table>
        </div>
      )}
      {openImg && <ImageDetail key={open} scope={scope} img={openImg} />}
    </>
  );
}
