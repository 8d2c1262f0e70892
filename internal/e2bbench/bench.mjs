// The SDK's part of `kiln bench e2b` (internal/e2bbench): the official e2b
// package, configured only by its documented environment. Prints one JSON
// line of milliseconds; progress goes to stderr.
import { Sandbox } from "e2b";

const runs = Number(process.env.KILN_RUNS);
const echoes = Number(process.env.KILN_ECHOES);
const out = { createToFirstOutput: [], echo: [] };
for (let i = 0; i < runs; i++) {
  const t0 = performance.now();
  const sbx = await Sandbox.create(process.env.KILN_TEMPLATE, { timeoutMs: 300_000 });
  try {
    let first;
    await sbx.commands.run("echo ready", { onStdout: () => { first ??= performance.now(); } });
    if (first === undefined) throw new Error("the first command printed nothing");
    out.createToFirstOutput.push(first - t0);
    for (let j = 0; j < echoes; j++) {
      const t = performance.now();
      const r = await sbx.commands.run("echo");
      out.echo.push(performance.now() - t);
      if (r.stdout !== "\n") throw new Error(`echo printed ${JSON.stringify(r.stdout)}`);
    }
  } finally {
    await sbx.kill();
  }
  console.error(`sandbox ${i + 1}/${runs}: create to first output ${Math.round(out.createToFirstOutput.at(-1))} ms`);
}
console.log(JSON.stringify(out));
