// Validates Prometheus Operator objects (a JSON array on stdin: ServiceMonitors and
// PrometheusRules) with the validators of @kubernetes-models/prometheus-operator, generated
// from prometheus-operator's Go API types: types, required fields, enums and duration
// patterns. Unknown fields are not rejected by them (the API server prunes those).
// An object of another kind, or another apiVersion, fails. Prints a JSON array:
// [{name, ok, errors}].
// Usage: node validate.mjs PREFIX < objects.json   (PREFIX holds node_modules/)
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const prefix = process.argv[2];
const KINDS = ["ServiceMonitor", "PrometheusRule"];
const classes = {};
for (const kind of KINDS) {
  const modulePath = join(
    prefix,
    `node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}.js`,
  );
  classes[kind] = (await import(pathToFileURL(modulePath).href))[kind];
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const name = obj?.metadata?.name ?? "?";
  const cls = classes[obj?.kind];
  if (!cls) {
    return { name, ok: false, errors: [`kind ${obj?.kind} is not one of ${KINDS.join(", ")}`] };
  }
  try {
    new cls(obj).validate();
    return { name, ok: true, errors: [] };
  } catch (err) {
    return { name, ok: false, errors: [String(err?.message ?? err)] };
  }
});
process.stdout.write(JSON.stringify(results));
