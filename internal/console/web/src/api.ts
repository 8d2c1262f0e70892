// The console's calls: the AWS operations of kiln's API under
// /console/api/aws (same paths, answers and error words), run as the
// signed-in account by the server; every call that changes state carries
// the session's CSRF token.
export const V = "/2025-09-09";
const BASE = "/console/api";

export class APIError extends Error {
  constructor(public status: number, public type: string, message: string) {
    super(message);
  }
}

export interface Session {
  accessKeyId: string;
  account: string;
  operator: boolean;
  accounts?: string[];
  csrfToken: string;
  expiresAt: string;
  domain: string;
}

let csrf = "";
export function setSession(s: Session | null) {
  csrf = s ? s.csrfToken : "";
}

async function call<T>(method: string, path: string, opts: { body?: unknown; raw?: BodyInit; account?: string; query?: Record<string, string> } = {}): Promise<T> {
  const headers: Record<string, string> = {};
  if (method !== "GET") headers["X-Kiln-Csrf"] = csrf;
  if (opts.account) headers["X-Kiln-Account"] = opts.account;
  let body: BodyInit | undefined;
  if (opts.raw !== undefined) {
    body = opts.raw;
    headers["Content-Type"] = "application/zip";
  } else if (opts.body !== undefined) {
    body = JSON.stringify(opts.body);
    headers["Content-Type"] = "application/json";
  }
  let url = BASE + path;
  if (opts.query) {
    const q = new URLSearchParams(Object.entries(opts.query).filter(([, v]) => v !== ""));
    if ([...q].length) url += "?" + q;
  }
  const resp = await fetch(url, { method, headers, body, credentials: "same-origin" });
  const text = await resp.text();
  let data: any = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text };
  }
  if (!resp.ok) {
    const type = resp.headers.get("x-amzn-ErrorType")?.split(":")[0] || data.__type || `HTTP ${resp.status}`;
    const msg = data.message || data.Message || resp.statusText;
    if (resp.status === 401) onSignedOut(msg);
    throw new APIError(resp.status, type, msg);
  }
  return data as T;
}

let signedOutHandler: (why: string) => void = () => {};
export function onSignedOutDo(f: (why: string) => void) {
  signedOutHandler = f;
}
function onSignedOut(why: string) {
  signedOutHandler(why);
}

export const signIn = (accessKeyId: string, secretAccessKey: string) =>
  call<Session>("POST", "/session", { body: { accessKeyId, secretAccessKey } });
export const whoAmI = () => call<Session>("GET", "/session");
export const signOut = () => call<void>("DELETE", "/session");
export const usage = () => call<any>("GET", "/usage");

export const aws = {
  get: <T = any>(path: string, account?: string, query?: Record<string, string>) => call<T>("GET", "/aws" + path, { account, query }),
  post: <T = any>(path: string, body: unknown, account?: string) => call<T>("POST", "/aws" + path, { body, account }),
  put: <T = any>(path: string, body: unknown, account?: string) => call<T>("PUT", "/aws" + path, { body, account }),
  del: <T = any>(path: string, account?: string) => call<T>("DELETE", "/aws" + path, { account }),
  upload: <T = any>(zip: Blob, account?: string) => call<T>("PUT", "/aws/kiln/v1/code-artifacts", { raw: zip, account }),
};

export const enc = encodeURIComponent;
