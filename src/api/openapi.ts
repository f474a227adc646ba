import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { packageRoot } from '../util/paths.js';
import { SandboxManager } from '../core/manager.js';
import { ConcurrencyGate } from './context.js';
import { Metrics } from './metrics.js';
import { SandboxRegistry } from './registry.js';
import { buildApp, API_VERSION } from './server.js';
import { StateStore } from './state.js';

export const OPENAPI_PATH = () => join(packageRoot(), 'docs', 'openapi.json');

/** The OpenAPI document the daemon serves at /v1/openapi.json, built from the route schemas. */
export async function openApiDocument(): Promise<string> {
  const scratch = mkdtempSync(join(tmpdir(), 'clade-openapi-'));
  try {
    const log = pino({ level: 'silent' });
    const registry = new SandboxRegistry(new SandboxManager({}), new StateStore(scratch), 1, log);
    const ctx = { registry, metrics: new Metrics(() => 0, () => 0), forkGate: new ConcurrencyGate(1, 'forks'), defaultTimeoutMs: 0, startedAt: 0, version: API_VERSION };
    const app = await buildApp(ctx, log);
    const doc = JSON.stringify(app.swagger(), null, 2) + '\n';
    await app.close();
    return doc;
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

// `npm run openapi` regenerates the checked-in copy; test/api/openapi.test.ts fails when it is stale.
if (import.meta.url === `file://${process.argv[1]}`) {
  writeFileSync(OPENAPI_PATH(), await openApiDocument());
  process.stdout.write(`wrote ${OPENAPI_PATH()}\n`);
}
