// Validates ServiceMonitor objects (a JSON array on stdin) with the validators of
// @kubernetes-models/prometheus-operator, generated from prometheus-operator's Go API types:
// types, required fields, enums and duration patterns. Unknown fields are not rejected by
// them (the API server prunes those). Prints a JSON array: [{name, ok, errors}].
// Usage: node validate.mjs PREFIX < objects.json   (PREFIX holds node_modules/)
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const prefix = process.argv[2];
const modulePath = join(
  prefix,
  "node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
);
const { ServiceMonitor } = await import(pathToFileURL(modulePath).href);

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const name = obj?.metadata?.name ?? "?";
  try {
    new ServiceMonitor(obj).validate();
    return { name, ok: true, errors: [] };
  } catch (err) {
    return { name, ok: false, errors: [String(err?.message ?? err)] };
  }
});
process.stdout.write(JSON.stringify(results));
