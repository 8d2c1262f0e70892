// Builds the console into ../dist (embedded by internal/console with
// go:embed). esbuild bundles the TypeScript/JSX and the CSS (xterm's
// included); index.html is copied. Nothing here reaches the network.
import { build } from "esbuild";
import { cpSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";

const out = new URL("../dist/", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
for (const f of readdirSync(out)) {
  if (f !== "README.md") rmSync(join(out, f), { recursive: true, force: true });
}
await build({
  entryPoints: { app: "src/main.tsx", style: "src/style.css" },
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "esm",
  target: ["chrome120", "firefox120"],
  jsx: "automatic",
  jsxImportSource: "preact",
  outdir: out,
  logLevel: "warning",
  legalComments: "linked",
});
cpSync("src/index.html", join(out, "index.html"));
cpSync("src/favicon.svg", join(out, "favicon.svg"));
console.log("console assets built into", out);
