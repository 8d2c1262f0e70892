// model.mjs prints the input shapes of every Lambda MicroVMs operation, as
// the official SDK's schema carries them (member names, where each goes on
// the wire, which are required, and their types), as JSON. kiln's
// validation table is checked against this extract
// (internal/api/testdata/aws-model.json; sdk_test.go checks that the
// committed extract matches the installed SDK).
//
// The SDK's schema carries no @length/@pattern/@range traits; those values
// come from AWS's API reference and are written in internal/api/rules.go.
import * as s from "@aws-sdk/client-lambda-microvms";

const deref = (x) => (typeof x === "function" ? x() : x);

function typeOf(sc) {
  sc = deref(sc);
  if (Array.isArray(sc) && typeof sc[1] !== "string") sc = deref(sc[0]); // [schema, traits]
  if (typeof sc === "number") {
    if (sc === (64 | 0)) return ["list", "string"];
    if (sc === (128 | 0)) return ["map", "string"];
    return [{ 0: "string", 1: "number", 2: "boolean", 4: "timestamp" }[sc] ?? "unknown:" + sc];
  }
  if (sc === "unit") return ["structure"];
  switch (sc[0]) {
    case 0: return [typeOf(sc[4])[0]]; // simple with traits (sensitive)
    case 1: return ["list", sc[4]];
    case 2: return ["map", sc[5]];
    case 3: return ["structure", sc];
    case 4: return ["union", sc];
  }
  return ["unknown"];
}

// A member is a schema, or [schema, traits] where traits is a bitmask
// (1 httpLabel, 4 idempotencyToken, 8 sensitive) or an object.
function traitsOf(m) {
  return Array.isArray(m) && m.length === 2 ? m[1] : 0;
}

function walk(out, prefix, sc, top) {
  const names = sc[4], members = sc[5], nreq = sc[0] === 3 ? sc[6] ?? 0 : 0;
  names.forEach((name, i) => {
    const m = members[i];
    const t = traitsOf(m);
    let location = "body";
    if (top && t === 1) location = "path";
    if (top && t && typeof t === "object" && t.httpQuery) location = "query:" + t.httpQuery;
    if (top && t && typeof t === "object" && t.httpHeader) location = "header:" + t.httpHeader;
    const [type, inner] = typeOf(m);
    const path = prefix + name;
    out.push({ path, location, required: i < nreq, type, idempotencyToken: t === 4 || undefined });
    addNested(out, path, type, inner);
  });
}

function addNested(out, path, type, inner) {
  if (type === "structure" || type === "union") {
    if (inner) walk(out, path + ".", inner, false);
  } else if (type === "list") {
    const [et, ei] = inner === "string" ? ["string"] : typeOf(inner);
    out.push({ path: path + "[]", location: "body", required: false, type: et });
    addNested(out, path + "[]", et, ei);
  } else if (type === "map") {
    const [vt, vi] = inner === "string" ? ["string"] : typeOf(inner);
    out.push({ path: path + "{}", location: "body", required: false, type: vt });
    addNested(out, path + "{}", vt, vi);
  }
}

const ops = {};
for (const [k, v] of Object.entries(s)) {
  if (!Array.isArray(v) || v[0] !== 9) continue;
  const [method, uri, status] = v[3].http;
  const members = [];
  walk(members, "", deref(v[4]), true);
  ops[v[2]] = { method, uri, status, members };
}
const sorted = Object.fromEntries(Object.keys(ops).sort().map((k) => [k, ops[k]]));
process.stdout.write(JSON.stringify(sorted, null, 1) + "\n");
