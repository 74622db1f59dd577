// run.sh's report: reads the runs in peers-results.jsonl (the argument), appends one
// {"kind":"median"} line per concurrency to it, and prints the tables.
import { appendFileSync, readFileSync } from "node:fs";

const file = process.argv[2];
const lines = readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
const runs = lines.filter((l) => l.kind === "run");
const concurrencies = [...new Set(runs.map((r) => r.concurrency))];

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length === 0 ? null : s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
};
const fmt = (n) => (n == null ? "-" : Math.round(n).toLocaleString("en-US"));
const pad = (s, n) => String(s).padStart(n);
const ratio = (m) => (m.ratio == null ? "-" : `${m.ratio.toFixed(2)}x`);

const medians = [];
for (const c of concurrencies) {
  const of = (side) =>
    runs.filter((r) => r.concurrency === c && r.side === side).sort((a, b) => a.run - b.run);
  const g = of("graphile-worker");
  const h = of("harness");
  const m = {
    kind: "median",
    concurrency: c,
    jobs: runs.find((r) => r.concurrency === c).jobs,
    runs: Math.max(g.length, h.length),
    graphile_per_s: median(g.map((r) => r.process_per_s)),
    harness_per_s: median(h.map((r) => r.process_per_s)),
  };
  m.ratio = m.graphile_per_s && m.harness_per_s != null ? m.harness_per_s / m.graphile_per_s : null;
  medians.push(m);
  appendFileSync(file, JSON.stringify(m) + "\n");

  console.log(`\nconcurrency ${c}: ${fmt(m.jobs)} no-op jobs, jobs/s`);
  const head = ["", ...Array.from({ length: m.runs }, (_, i) => `run ${i + 1}`), "median"];
  console.log(head.map((t, i) => (i === 0 ? t.padEnd(17) : pad(t, 9))).join(""));
  for (const [label, rows, med] of [
    ["graphile-worker", g, m.graphile_per_s],
    ["harness", h, m.harness_per_s],
  ]) {
    const cells = rows.map((r) => pad(fmt(r.process_per_s), 9)).join("");
    console.log(label.padEnd(17) + cells.padEnd(9 * m.runs) + pad(fmt(med), 9));
  }
  console.log("harness/graphile".padEnd(17) + pad("", 9 * m.runs) + pad(ratio(m), 9));
}

console.log("\nsummary (medians, jobs/s)");
console.log("concurrency" + pad("graphile-worker", 17) + pad("harness", 10) + pad("harness/graphile", 18));
for (const m of medians) {
  console.log(
    pad(m.concurrency, 11) + pad(fmt(m.graphile_per_s), 17) + pad(fmt(m.harness_per_s), 10) + pad(ratio(m), 18),
  );
}
